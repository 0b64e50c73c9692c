"""statefsd's self-tests, as run in the QEMU guest and by hand.

``statefsd --selftest --image DEV`` checks, printing one marker per check and
only when every step of it held:

* real device: write, read back, unmount, replay, read again;
* ``SELFTEST: statefs v2 enc ok`` (encryption on): the above plus, on a
  scratch simulated device with the same key, tampered ciphertext reads as
  EINTEGRITY and never as plaintext, and replay drops the tampered txn;
* ``SELFTEST: statefs v2 crash-atomic ok``: on a scratch simulated device, a
  multi-key txn cut at every sampled point before its flush is all or
  nothing after replay, and whole when cut after the flush;
* ``SELFTEST: statefs v2 compact ok``: compaction keeps every value, a cut
  before its superblock switch keeps the old state, and replay after it
  gives the new one.

The first run also stores a boot token; ``--selftest-persist`` on a later
boot prints ``SELFTEST: statefs cold-boot persist ok`` if it reads it back.
``--crash-writer`` commits numbered two-key transactions forever, printing
``ACK <txn_id> <n>`` after each durable commit (for host-driven power cuts).
"""

from __future__ import annotations

import hashlib
import os

from statefsd.storage import format as fmt
from statefsd.storage.blockdev import FileDevice
from statefsd.storage.engine import Engine, Mutation
from statefsd.storage.image import read_superblock
from statefsd.errors import FormatError, IntegrityError, StateFSError
from statefsd.keystore import KeystoreSigner, encryption_banner, keystore_key_provider
from statefsd.testing.simdev import Outcome, SimulatedDevice

SCRATCH_BYTES = 2 << 20
PERSIST_KEY = "selftest/persist-token"


class Failed(Exception):
    pass


def check(condition: bool, what: str) -> None:
    if not condition:
        raise Failed(what)


def say(line: str) -> None:
    print(line, flush=True)


def main(args) -> int:
    provider = keystore_key_provider(getattr(args, "keystore_socket", None))
    try:
        if args.crash_writer is not None:
            return crash_writer(args.image, provider)
        if args.selftest_persist is not None:
            return persist_check(args.image, provider)
        return selftest(args, provider)
    except Failed as exc:
        say(f"SELFTEST: FAILED: {exc}")
        return 1
    except StateFSError as exc:
        say(f"SELFTEST: FAILED: {exc}")
        return int(exc.code)


def _scratch(encryption: str) -> tuple[SimulatedDevice, dict]:
    dev = SimulatedDevice(SCRATCH_BYTES)
    Engine.mkfs(dev, encryption=encryption)
    return dev, {}


def selftest(args, provider) -> int:
    encryption = getattr(args, "encryption", None) or os.environ.get("STATEFS_ENCRYPTION", "off")
    with FileDevice(args.image) as dev:
        try:
            sb, _ = read_superblock(dev)
            fresh = bool(getattr(args, "mkfs", False))
        except FormatError:
            fresh = True
        if fresh:
            sb = Engine.mkfs(dev, encryption=encryption,
                             key_provider=provider if encryption == "on" else None)
    say(encryption_banner(sb))
    encrypted = sb.encryption != fmt.ENCRYPTION_OFF
    key = provider(sb) if encrypted else None
    fixed = (lambda _sb: key) if encrypted else None

    socket_path = getattr(args, "keystore_socket", None)
    device_round_trip(args.image, provider, KeystoreSigner(socket_path) if socket_path else None)
    if encrypted:
        tamper_round_trip(fixed)
        say("SELFTEST: statefs v2 enc ok")
    crash_atomic(fixed, "on" if encrypted else "off")
    say("SELFTEST: statefs v2 crash-atomic ok")
    compaction(fixed, "on" if encrypted else "off")
    say("SELFTEST: statefs v2 compact ok")
    return 0


def device_round_trip(image: str, provider, signer=None) -> None:
    value = hashlib.sha256(os.urandom(16)).digest() * 6000  # ~190 KiB: several chunks
    token = os.urandom(16).hex().encode()
    with Engine.mount(FileDevice(image), key_provider=provider, signer=signer) as e:
        e.commit([Mutation("put", "selftest/value", value), Mutation("put", PERSIST_KEY, token)])
        check(e.get("selftest/value") == value, "read back on the device")
    with Engine.mount(FileDevice(image), key_provider=provider, signer=signer) as e:
        if signer is not None:
            check(e.replay_summary["verified_checkpoints"] >= 1, "no verified checkpoint after unmount")
        check(e.get("selftest/value") == value, "value after replay on the device")
        check(e.get(PERSIST_KEY) == token, "token after replay on the device")
    say(f"SELFTEST: device round trip ok (token {token.decode()})")


def tamper_round_trip(provider) -> None:
    dev, _ = _scratch("on")
    e = Engine.mount(dev, key_provider=provider)
    e.put("victim", b"secret value " * 100)
    e.put("bystander", b"fine")
    (offset, plen), = e.index[b"victim"].chunks
    raw = bytearray(dev.read(offset, fmt.HEADER_SIZE + plen))
    check(b"secret value" not in raw, "plaintext visible in a sealed record")
    raw[fmt.HEADER_SIZE + 3] ^= 0x01
    fmt.restamp_record_crc(raw)
    start = offset // 512 * 512
    stop = fmt.align_up(offset + len(raw))
    block = bytearray(dev.read(start, stop - start))
    block[offset - start:offset - start + len(raw)] = raw
    dev.write(start, bytes(block))
    dev.flush()
    try:
        e.get("victim")
        raise Failed("tampered ciphertext was returned as plaintext")
    except IntegrityError:
        pass
    check(e.get("bystander") == b"fine", "untouched value after tamper")
    e.close()
    # Replay of the tampered image never shows the victim's plaintext.
    try:
        with Engine.mount(SimulatedDevice.from_image(dev.image()), read_only=True, key_provider=provider) as r:
            check("victim" not in r.list(), "tampered txn visible after replay")
    except StateFSError as exc:
        check(exc.code.name in ("ECORRUPT", "EINTEGRITY"), f"unexpected error after tamper: {exc}")


def crash_atomic(provider, encryption: str) -> None:
    dev, _ = _scratch(encryption)
    with Engine.mount(dev, key_provider=provider) as e:
        e.put("before", b"A")
        mark = len(dev.trace)
        e.commit([Mutation("put", "txn/1", b"x" * 70000), Mutation("put", "txn/2", b"y"),
                  Mutation("delete", "before")])
    points = list(dev.trace.crash_points(start=mark))
    check(len(points) >= 2, "the txn produced no writes")
    states = set()
    for point in points:
        for outcome in point.outcomes(limit=40, rng=7):
            with Engine.mount(point.device(outcome), key_provider=provider) as r:
                state = tuple(r.list())
            whole = state == ("txn/1", "txn/2")
            check(whole or state == ("before",), f"partial transaction after a cut: {state}")
            states.add(whole)
    check(states == {True, False}, "cuts never hit both sides of the commit point")
    after_flush = points[-1]
    check(not after_flush.pending, "the txn was not flushed before commit returned")
    with Engine.mount(after_flush.device(Outcome.keep_all(0)), key_provider=provider) as r:
        check(r.list() == ["txn/1", "txn/2"], "txn missing after a cut following its flush")


def compaction(provider, encryption: str) -> None:
    dev, _ = _scratch(encryption)
    with Engine.mount(dev, key_provider=provider) as e:
        for i in range(60):
            e.put(f"k{i % 5}", bytes([i]) * 5000)
        expected = {k: e.get(k) for k in e.list()}
        mark = len(dev.trace)
        e.compact()
        check({k: e.get(k) for k in e.list()} == expected, "values after compaction")
    for point in dev.trace.crash_points(start=mark):
        for outcome in point.outcomes(limit=8, rng=3):
            with Engine.mount(point.device(outcome), key_provider=provider) as r:
                got = {k: r.get(k) for k in r.list()}
            check(got == expected, "state after a cut during compaction")


def persist_check(image: str, provider) -> int:
    with FileDevice(image, read_only=True) as dev:
        sb, _ = read_superblock(dev)
    say(encryption_banner(sb))
    with Engine.mount(FileDevice(image), key_provider=provider) as e:
        token = e.get(PERSIST_KEY)
        check(len(token) == 32, "boot token has the wrong size")
        check(len(e.get("selftest/value")) == 32 * 6000, "value from the first boot")
    say(f"SELFTEST: statefs cold-boot persist ok (token {token.decode()})")
    return 0


def crash_writer(image: str, provider) -> int:
    with FileDevice(image, read_only=True) as dev:
        sb, _ = read_superblock(dev)
    say(encryption_banner(sb))
    with Engine.mount(FileDevice(image), key_provider=provider) as e:
        n = len(e.list("crash/")) // 2
        while True:
            v = f"{n}".encode() * 50
            txn = e.commit([Mutation("put", f"crash/{n}/a", v), Mutation("put", f"crash/{n}/b", v)])
            say(f"ACK {txn} {n}")
            n += 1
