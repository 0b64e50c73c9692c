"""Judge a guest's serial console: did every expected marker appear, and nothing bad?

  .venv/bin/python qemu/check_markers.py --mode selftest --enc on serial.log

Exit 0 and "markers ok", or exit 1 and one line per problem. A marker counts only as a
whole console line, optionally followed by details in parentheses ("... ok (token 6d24)");
QEMU's CRLF and surrounding blanks are ignored.

Rules:
 1. Every marker of the mode is present (REQUIRED below; the banner depends on --enc).
 2. The encryption banner and its round-trip marker come together: in a selftest boot
    "encryption on" without "enc ok" fails; in any boot "enc ok" without "encryption on".
 3. The banner matches what was asked: "encryption off" when --enc on fails, and back.
 4. No "GUEST: command failed", no Python traceback, no failed SELFTEST line (one that
    says FAIL, error or "not ok", or lacks the word "ok").
 5. The guest finished: "GUEST: exit 0" is present (crashloop guests are killed, so not
    there; a crashloop guest must have acknowledged at least one transaction).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ENC_ON = "statefsd: encryption on (xchacha20poly1305)"
ENC_OFF = "statefsd: encryption off"
ENC_OK = "SELFTEST: statefs v2 enc ok"

REQUIRED = {
    "smoke": ["SELFTEST: smoke ok"],
    "selftest": ["SELFTEST: statefs v2 crash-atomic ok", "SELFTEST: statefs v2 compact ok"],
    "persist": ["SELFTEST: statefs cold-boot persist ok"],
    "crashloop": [],
    "writetest": ["SELFTEST: writetest ok"],
}
# Modes in which statefsd runs and must announce whether it encrypts.
STATEFSD_MODES = {"selftest", "persist", "crashloop"}

ACK = re.compile(r"^ACK (\d+) (\S+)$")
EXIT = re.compile(r"^GUEST: exit (\d+)$")
SELFTEST_OK = re.compile(r"\bok\b")
SELFTEST_BAD = re.compile(r"\bfail|\berror|\bnot ok\b", re.IGNORECASE)


def lines(serial: str) -> list[str]:
    return [line.strip() for line in serial.replace("\r\n", "\n").split("\n")]


def has(seen: list[str], marker: str) -> bool:
    return any(line == marker or line.startswith(marker + " (") for line in seen)


def expected(mode: str, enc: bool) -> list[str]:
    if mode not in REQUIRED:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(REQUIRED)}")
    markers = list(REQUIRED[mode])
    if mode in STATEFSD_MODES:
        markers.insert(0, ENC_ON if enc else ENC_OFF)
    if mode == "selftest" and enc:
        markers.append(ENC_OK)
    return markers


def acked_transactions(serial: str) -> list[tuple[int, str]]:
    """(txn_id, key) of every "ACK <txn_id> <key>" line, in console order."""
    return [(int(m.group(1)), m.group(2)) for m in map(ACK.match, lines(serial)) if m]


def check(serial: str, mode: str, enc: bool) -> list[str]:
    """Problems found in `serial` (empty when the boot passed)."""
    seen = lines(serial)
    problems = [f"missing marker: {m}" for m in expected(mode, enc) if not has(seen, m)]

    if has(seen, ENC_ON) and not has(seen, ENC_OK) and mode == "selftest":
        problems.append(f"'{ENC_ON}' without '{ENC_OK}'")
    if has(seen, ENC_OK) and not has(seen, ENC_ON):
        problems.append(f"'{ENC_OK}' without '{ENC_ON}'")
    wrong = ENC_OFF if enc else ENC_ON
    if has(seen, wrong):
        problems.append(f"asked for encryption {'on' if enc else 'off'} but saw '{wrong}'")

    for line in seen:
        if line.startswith("GUEST: command failed"):
            problems.append(line)
        elif line.startswith("Traceback (most recent call last)"):
            problems.append("a Python traceback on the console")
        elif line.startswith("SELFTEST:") and (SELFTEST_BAD.search(line)
                                               or not SELFTEST_OK.search(line)):
            problems.append(f"failed self-test: {line}")

    exits = [int(m.group(1)) for m in map(EXIT.match, seen) if m]
    if mode == "crashloop":
        if not acked_transactions(serial):
            problems.append("no ACK line: the crash writer acknowledged nothing")
    elif not exits:
        problems.append("the guest did not finish (no 'GUEST: exit' line)")
    elif exits[-1] != 0:
        problems.append(f"the guest program exited with status {exits[-1]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Check a StateFS guest's serial log.")
    ap.add_argument("--mode", required=True, choices=sorted(REQUIRED))
    ap.add_argument("--enc", choices=("on", "off"), default="off")
    ap.add_argument("serial_log", type=Path)
    args = ap.parse_args(argv)
    try:
        text = args.serial_log.read_text(errors="replace")
    except OSError as exc:
        print(f"check_markers: cannot read {args.serial_log}: {exc.strerror}", file=sys.stderr)
        return 1
    problems = check(text, args.mode, args.enc == "on")
    for p in problems:
        print(f"check_markers: {args.mode} enc={args.enc}: {p}")
    if not problems:
        print(f"check_markers: {args.mode} enc={args.enc}: markers ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
