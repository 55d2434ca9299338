"""Encrypting mail already at rest: what was stored before a user enrolled, and what mail
clients store themselves over IMAP.

Everything goes through Dovecot's own IMAP server (``dovecot.py``), so any storage backend
works and Dovecot's locking keeps concurrent delivery and clients safe; ``replace.py`` is the
crash-safe replace-in-place of one message, ``marker.py`` how a later run recognises a copy
it made, ``run.py`` the run over users and folders (and the sweep's state).
"""
