"""The REST API (FastAPI): operators manage their fleet here; devices attest here."""
