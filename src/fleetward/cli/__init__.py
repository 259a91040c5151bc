"""The ``fleetward`` command: runs the server and speaks to its API."""
