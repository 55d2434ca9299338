"""The mail path, in the order a message flows through it::

receive.py     the SMTP/LMTP server Postfix hands mail to (aiosmtpd)
  -> filter.py     per recipient: decide, encrypt, answer
       rawmessage.py   header fields and body, without changing a byte
       classify.py     already encrypted? (by structure)
       recipients.py   the address a key is looked up by
       (the engine, gpgfilter.openpgp; the keys, keystore)
       pgpmime.py      the RFC 3156 message around the ciphertext
  -> deliver.py    the LMTP/SMTP client to Dovecot or back to Postfix
"""
