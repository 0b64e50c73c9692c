"""One home for every StateFS error.

Each error has a stable name (``EINTEGRITY``) and a stable number. The same
pair travels on the wire (protocol error frames), is raised by the client
library, and is the exit status of the ``statefs`` CLI. Numbers never change
meaning once released; new errors get new numbers.

fsck-statefs and ``statefs verify`` are the exceptions: their exit status
follows fsck(8) (see ``FsckExit``), because tools that call fsck expect that
convention.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """Stable error codes. The value is also the CLI exit status."""

    OK = 0
    EUSAGE = 2          # bad command line (argparse uses 2 as well)
    EINVAL = 10         # malformed argument: bad key, bad JSON, bad option
    ENOTFOUND = 11      # key does not exist
    ETOOBIG = 12        # key, value or transaction over a documented cap
    ENOSPC = 13         # device full: nothing committed was harmed
    EINTEGRITY = 14     # authentication or checksum of stored data failed
    ECORRUPT = 15       # image damaged in a way mount will not guess about
    EFORMAT = 16        # not a StateFS image, or an unsupported format version
    EBUSY = 17          # image already held by another statefsd / fsck
    EPROTO = 18         # malformed frame or unknown protocol version
    EREADONLY = 19      # mounted read-only: writes refused
    EKEY = 20           # key unavailable: keystored unreachable or refused
    ECONN = 21          # cannot reach statefsd
    EIO = 22            # the device returned an I/O error
    EENTROPY = 23       # kernel entropy not ready: no keys handed out
    EACCES = 24         # caller not allowed (keystored access control)
    ETXN = 25           # transaction misuse (unknown txn, commit after abort)
    EPASSPHRASE = 26    # wrong or missing passphrase for a sealed key file
    ECONFLICT = 27      # a condition of a transaction no longer held: nothing was written
    EPEER = 28          # a replication peer or remote cannot be reached or refused the transfer
    EROLLBACK = 29      # a signed copy is newer than, or diverges from, this device's history
    EINTERNAL = 99      # a bug: please report it with the audit journal


# What the user should do next, per code. Messages say what happened; hints say what to do.
HINTS: dict[Code, str] = {
    Code.EUSAGE: "see --help",
    Code.EINVAL: "check the argument against the limits in docs/statefs.md",
    Code.ENOTFOUND: "list keys with 'statefs ls'",
    Code.ETOOBIG: "split the value or transaction; limits are in docs/statefs.md",
    Code.ENOSPC: "delete keys or compact; committed data is intact",
    Code.EINTEGRITY: "stored data failed authentication; run fsck-statefs and restore from a trusted copy",
    Code.ECORRUPT: "run fsck-statefs on the image; mount read-only to read the committed prefix",
    Code.EFORMAT: "is this a StateFS image? create one with 'statefs mkfs'",
    Code.EBUSY: "another process holds the image; stop it or use its socket",
    Code.EPROTO: "client and daemon disagree on the protocol; upgrade the older one",
    Code.EREADONLY: "the image is mounted read-only; run fsck-statefs",
    Code.EKEY: "start keystored and check --keystore-socket and its access list",
    Code.ECONN: "is statefsd running? check --socket or STATEFS_SOCKET",
    Code.EIO: "the device failed; check dmesg",
    Code.EENTROPY: "wait for the kernel entropy pool (a virtio-rng device helps)",
    Code.EACCES: "ask the administrator to allow this uid and label in keystored",
    Code.ETXN: "begin a new transaction",
    Code.EPASSPHRASE: "supply the right passphrase (STATEFS_KEY_PASSPHRASE)",
    Code.ECONFLICT: "read the keys again and retry the transaction with their new txn ids",
    Code.EPEER: "check that the peer or remote is up and reachable ('statefs replicate status'); nothing local was lost",
    Code.EROLLBACK: "do not write to this image: compare it with 'statefs replicate status' and restore from the newest copy",
    Code.EINTERNAL: "please report this bug with the audit journal",
}


class StateFSError(Exception):
    """Base of every StateFS error; carries a stable :class:`Code`."""

    code: Code = Code.EINTERNAL

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    @property
    def hint(self) -> str:
        """The one next step that fits: a hint given where the error was
        raised (``hint=...``) beats the code's general advice."""
        return str(self.details.get("hint") or HINTS.get(self.code, ""))

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def to_wire(self) -> dict:
        wire = {"code": int(self.code), "name": self.code.name, "message": self.message}
        if self.details.get("hint"):
            wire["hint"] = str(self.details["hint"])
        return wire

    @staticmethod
    def from_wire(payload: dict) -> "StateFSError":
        try:
            code = Code(int(payload.get("code", Code.EINTERNAL)))
        except ValueError:
            code = Code.EINTERNAL
        hint = payload.get("hint")
        extra = {"hint": hint} if isinstance(hint, str) and hint else {}
        return error_class(code)(str(payload.get("message", "")), **extra)


def _make(name: str, code: Code, doc: str) -> type[StateFSError]:
    return type(name, (StateFSError,), {"code": code, "__doc__": doc})


UsageError = _make("UsageError", Code.EUSAGE, "Bad command line.")
InvalidArgument = _make("InvalidArgument", Code.EINVAL, "A malformed argument.")
NotFound = _make("NotFound", Code.ENOTFOUND, "The key does not exist.")
TooBig = _make("TooBig", Code.ETOOBIG, "A key, value or transaction exceeds a cap.")
NoSpace = _make("NoSpace", Code.ENOSPC, "The device is full.")
IntegrityError = _make("IntegrityError", Code.EINTEGRITY, "Stored data failed authentication or its checksum.")
CorruptImage = _make("CorruptImage", Code.ECORRUPT, "The image is damaged beyond a torn tail.")
FormatError = _make("FormatError", Code.EFORMAT, "Not a StateFS image, or an unsupported version.")
Busy = _make("Busy", Code.EBUSY, "The image is held by another process.")
ProtocolError = _make("ProtocolError", Code.EPROTO, "A malformed frame or unknown protocol version.")
ReadOnly = _make("ReadOnly", Code.EREADONLY, "The image is mounted read-only.")
KeyUnavailable = _make("KeyUnavailable", Code.EKEY, "The encryption key could not be obtained.")
ConnectionFailed = _make("ConnectionFailed", Code.ECONN, "statefsd cannot be reached.")
DeviceIOError = _make("DeviceIOError", Code.EIO, "The device returned an I/O error.")
EntropyNotReady = _make("EntropyNotReady", Code.EENTROPY, "Kernel entropy is not ready.")
AccessDenied = _make("AccessDenied", Code.EACCES, "The caller is not allowed.")
TransactionError = _make("TransactionError", Code.ETXN, "Transaction misuse.")
WrongPassphrase = _make("WrongPassphrase", Code.EPASSPHRASE, "Wrong or missing passphrase.")
Conflict = _make("Conflict", Code.ECONFLICT, "A condition of the transaction no longer holds.")
PeerUnavailable = _make("PeerUnavailable", Code.EPEER, "A replication peer or remote failed.")
RolledBack = _make("RolledBack", Code.EROLLBACK, "A signed copy is newer than or diverges from this history.")
InternalError = _make("InternalError", Code.EINTERNAL, "A bug.")

_BY_CODE: dict[Code, type[StateFSError]] = {
    cls.code: cls
    for cls in (
        UsageError, InvalidArgument, NotFound, TooBig, NoSpace, IntegrityError, CorruptImage,
        FormatError, Busy, ProtocolError, ReadOnly, KeyUnavailable, ConnectionFailed,
        DeviceIOError, EntropyNotReady, AccessDenied, TransactionError, WrongPassphrase,
        Conflict, PeerUnavailable, RolledBack, InternalError,
    )
}


def error_class(code: Code) -> type[StateFSError]:
    return _BY_CODE.get(code, InternalError)


class FsckExit(enum.IntEnum):
    """fsck(8) exit codes, used only by fsck-statefs and `statefs verify`
    (they are bit flags)."""

    CLEAN = 0
    CORRECTED = 1
    UNCORRECTED = 4
    OPERATIONAL = 8
    USAGE = 16
