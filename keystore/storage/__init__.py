"""Where keys are kept: SQLite or PostgreSQL."""
