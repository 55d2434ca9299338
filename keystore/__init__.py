"""The registry of users' OpenPGP keys: the only source of truth for "is this user enrolled"."""
