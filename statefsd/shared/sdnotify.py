"""Readiness notifications to systemd (sd_notify), as both daemons send them."""

from __future__ import annotations

import os
import socket
from typing import Callable


def sd_notify(state: str, warn: Callable[[str], None]) -> bool:
    """Send ``state`` (e.g. "READY=1") to $NOTIFY_SOCKET ('@' = abstract
    namespace); False without one. A notify socket that cannot be reached
    costs a warning through ``warn``, never the daemon."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode())
    except OSError as exc:
        warn(f"sd_notify to {address} failed: {exc}")
        return False
    return True
