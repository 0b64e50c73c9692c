"""The listening-socket path rules statefsd and keystored share.

A daemon takes its --socket path only when it can be its own: the directory
exists, the path is not a directory or some other file (never replaced), and
no process listens there. A socket file nobody listens on was left by a
daemon that died and is replaced. These checks run before a daemon does
anything lasting (mounting an image, creating a key), so a second start
fails at once and names the socket.
"""

from __future__ import annotations

import os
import socket
import stat

from statefsd.errors import Busy, DeviceIOError, InvalidArgument


def check_socket_path(path: str, *, owner: str, example: str, remove_stale: bool = False) -> None:
    """Refuse a path ``owner`` (e.g. 'statefsd') cannot listen on; with
    ``remove_stale``, unlink a socket nobody listens on. ``example`` is the
    file name suggested inside a directory given by mistake."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InvalidArgument(f"cannot listen on {path}: directory {parent} does not exist",
                              hint=f"create the directory first with mkdir -p {parent}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"--socket {path} is a directory",
                              hint=f"give a socket path inside it, e.g. {os.path.join(path, example)}")
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidArgument(f"{path} exists and is not a socket; refusing to replace it",
                              hint="remove it yourself if it is not needed, or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        if remove_stale:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return
    except OSError as exc:
        raise DeviceIOError(f"cannot probe existing socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise Busy(f"another process is already listening on {path}",
               hint=f"is {owner} already running? use its socket, or choose another --socket")
