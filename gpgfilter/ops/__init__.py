"""Operations: wiring gpgfilter into Postfix and Dovecot, and checking it."""
