"""The monitor: what devices report about themselves, and (to come) health, detection and response."""
