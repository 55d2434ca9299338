"""The mail path."""
