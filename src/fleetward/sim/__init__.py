"""Simulated devices: real roots of trust and real enrollment clients, many at once."""
