"""statefsd: the process that owns one StateFS image and serves it on a socket.

    statefsd --image PATH --socket PATH [--audit PATH] [--read-only]
             [--keystore-socket PATH] [limits: --txn-budget, --frame-deadline,
             --idle-deadline, --max-connections, --max-connections-per-uid]

Startup order: check the socket path (nobody serves it), lock and mount the
image, print the encryption mode, listen,
print ``statefsd: ready on SOCKET`` and tell systemd READY=1. SIGTERM or
SIGINT stops accepting, lets requests in flight finish, closes the engine
(which flushes), removes the socket and exits 0. A startup failure prints
``statefsd: ERROR <NAME>: message (hint)`` and exits with the error's code.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from statefsd.shared.audit import AuditLog
from statefsd.shared.sdnotify import sd_notify
from statefsd.errors import InternalError, StateFSError

log = logging.getLogger("statefsd")

_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def server_version() -> str:
    try:
        from importlib.metadata import version
        return version("statefs")
    except Exception:  # running from a source tree that was never installed
        import statefsd
        return getattr(statefsd, "__version__", "unknown")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="statefsd", description="Serve a StateFS image on a Unix socket.",
        usage="statefsd --image PATH --socket PATH [--audit PATH] [--read-only] [--keystore-socket PATH] "
              "[--txn-budget SIZE] [limits]")
    # Required in use, but not to argparse: --selftest runs without them.
    required = parser.add_argument_group("required")
    required.add_argument("--image", metavar="PATH", help="image file or block device (e.g. /dev/vda)")
    required.add_argument("--socket", metavar="PATH", default=os.environ.get("STATEFS_SOCKET"),
                          help="Unix socket to listen on (may come from $STATEFS_SOCKET instead)")
    parser.add_argument("--audit", metavar="PATH", help="append the audit journal (JSON lines) to this file")
    parser.add_argument("--read-only", action="store_true", help="mount read-only; writes are refused")
    parser.add_argument("--keystore-socket", metavar="PATH",
                        help="keystored socket, needed for encrypted images")
    from statefsd.protocol import ENDPOINT
    ENDPOINT.add_limit_flags(parser, "frame_deadline", "idle_deadline", "max_connections",
                             "max_connections_per_uid")
    parser.add_argument("--txn-budget", metavar="SIZE", type=_txn_budget, default=None,
                        help="bytes all open transactions together may buffer (K/M/G suffixes; "
                             "default: four maximum-size transactions, about 64M)")
    # Any of these flags hands the whole argument namespace to
    # statefsd/testing/selftest.py's main(args), imported only then (docs/DESIGN.md, "Layers").
    selftest = parser.add_argument_group("self tests (see statefsd/testing/selftest.py)")
    selftest.add_argument("--selftest", nargs="?", const=True, default=None, metavar="ARG",
                          help="run the guest self test instead of serving")
    # Internal to the QEMU and power-loss harnesses: not for users, not in --help.
    for flag in ("--selftest-persist", "--crash-writer"):
        selftest.add_argument(flag, nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    selftest.add_argument("--mkfs", action="store_true", help="with --selftest: format the image first")
    selftest.add_argument("--encryption", choices=("on", "off"), help="with --selftest: encryption mode")
    return parser


def _txn_budget(text: str) -> int:
    """--txn-budget: a size no smaller than one maximum-size transaction."""
    from statefsd.storage.blockdev import parse_size
    from statefsd.server import MIN_TXN_BUDGET
    try:
        size = parse_size(text)
    except StateFSError as exc:
        raise argparse.ArgumentTypeError(f"{exc.message} ({exc.hint})") from None
    if size < MIN_TXN_BUDGET:
        raise argparse.ArgumentTypeError(
            f"{text} cannot hold one maximum-size transaction ({MIN_TXN_BUDGET} bytes); "
            f"give at least {-(-MIN_TXN_BUDGET >> 20)}M")
    return size


def main(argv: list[str] | None = None) -> int:
    # The parser reads the limits' defaults from the protocol, whose imports
    # may start a thread; block the stop signals first so that no thread
    # ever has them unblocked (see serve()). The self tests get them back.
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    parser = build_parser()
    args = parser.parse_args(argv)
    if any(v is not None for v in (args.selftest, args.selftest_persist, args.crash_writer)):
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        from statefsd.testing import selftest
        return int(selftest.main(args) or 0)
    if args.mkfs or args.encryption:
        parser.error("--mkfs and --encryption go with --selftest; format images with 'statefs mkfs'")
    missing = [flag for flag, value in (("--image", args.image), ("--socket", args.socket)) if not value]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}"
                     + (" (or set STATEFS_SOCKET)" if "--socket" in missing else ""))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="statefsd: %(levelname)s %(name)s: %(message)s")
    audit = AuditLog(None, component="statefsd")
    try:
        audit = AuditLog(args.audit, component="statefsd")
        return serve(args, audit)
    except StateFSError as exc:
        return _startup_failed(exc, audit, args.image)
    except Exception as exc:  # a bug: still leave a clear last line and the audit trail
        log.exception("startup failed")
        return _startup_failed(InternalError(f"{type(exc).__name__}: {exc}"), audit, args.image)
    finally:
        audit.close()


def _startup_failed(exc: StateFSError, audit: AuditLog, image: str) -> int:
    audit("startup_failed", code=exc.code.name, message=exc.message, image=image)
    print(f"statefsd: ERROR {exc.code.name}: {exc.message} ({exc.hint})", file=sys.stderr, flush=True)
    return int(exc.code)


def serve(args: argparse.Namespace, audit: AuditLog) -> int:
    # Stop signals are blocked in every thread and collected by sigwait
    # below: no handler can run at an awkward moment inside a lock.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    from statefsd.storage.blockdev import FileDevice
    from statefsd.storage.engine import Engine
    from statefsd.keystore import KeystoreSigner, encryption_banner, keystore_key_provider
    from statefsd.protocol import ENDPOINT
    from statefsd.server import DEFAULT_TXN_BUDGET, Server, encryption_mode, share_one_heap
    share_one_heap()

    # With a keystore, checkpoints are signed and verified with the device key;
    # an unreachable keystore that was asked for is an error, not a downgrade.
    signer = KeystoreSigner(args.keystore_socket) if args.keystore_socket else None
    # A socket that cannot be ours fails the start before the image is
    # locked and replayed, naming the socket (not the image) as the problem.
    ENDPOINT.check_socket_path(args.socket)
    device = FileDevice(args.image, read_only=args.read_only)
    # The provider asks keystored only if the image turns out to be encrypted.
    engine = Engine.mount(device, read_only=args.read_only, audit=audit,
                          key_provider=keystore_key_provider(args.keystore_socket), signer=signer)
    try:
        mode = encryption_mode(engine.info())
        print(encryption_banner(engine.sb), flush=True)
        listener = ENDPOINT.with_limits(args).listen(args.socket)
        server = Server(engine, listener, audit=audit, version=server_version(),
                        txn_budget=args.txn_budget or DEFAULT_TXN_BUDGET)
        server.start()
        audit("daemon_start", pid=os.getpid(), image=args.image, socket=args.socket,
              read_only=bool(engine.read_only), encryption=mode, version=server.version)
        print(f"statefsd: ready on {args.socket}", flush=True)
        sd_notify(f"READY=1\nSTATUS=serving {args.image} on {args.socket}\nMAINPID={os.getpid()}", log.warning)
        signum = signal.sigwait(_STOP_SIGNALS)
        sd_notify("STOPPING=1", log.warning)
        log.info("received %s: finishing requests in flight", signal.Signals(signum).name)
        server.shutdown()
    finally:
        engine.close()
        device.close()
    audit("shutdown", signal=signal.Signals(signum).name)
    print("statefsd: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
