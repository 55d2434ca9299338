"""OpenPGP: the engine seam."""
