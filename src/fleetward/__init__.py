"""fleetward: secures fleets of connected devices end to end."""

__version__ = "0.1.0"
