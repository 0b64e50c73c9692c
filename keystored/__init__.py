"""keystored: the process that owns the device identity.

It holds an Ed25519 signing key and a 32-byte root secret, never lets them
leave the process, and answers ``derive``/``sign``/``public_key`` requests
over a Unix socket to the uids its access list allows. Protocol, key-file
bytes and design: docs/keystored.md.
"""
