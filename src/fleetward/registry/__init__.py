"""The registry: tenants, operators and their roles, API tokens, products, device groups and devices."""
