"""Plumbing both daemons share: Unix-socket RPC, the audit log, signing."""
