"""Replication: sealed segments and signed heads of an image's committed history, carried by Syncthing and rclone (docs/DESIGN.md, "Replication")."""
