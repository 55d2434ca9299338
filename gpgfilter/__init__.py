"""gpgfilter: encrypt every incoming message to its recipient's OpenPGP key before it is stored."""

__version__ = "0.1.0"
