"""The device side: roots of trust and the enrollment client (the agent grows around them)."""
