"""The store: one schema on SQLite (embedded default) or PostgreSQL (scale-out)."""
