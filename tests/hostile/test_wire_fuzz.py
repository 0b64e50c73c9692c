"""Both wire protocols against a seeded fuzzer, on real daemons and real sockets.

Random bytes, frames of noise, random msgpack trees (wrong types, non-str
map keys, invalid UTF-8, ext types), nesting thousands deep, length
prefixes and msgpack headers that lie, unknown ops and fields, and requests
shaped like the real ones with one thing broken. Meanwhile a normal client
keeps working. The daemon must not die, never answer EINTERNAL, keep every
reply within its frame cap, and give the normal client only right answers.
Time is bounded (the case count, and a budget in seconds that stops early).
"""

from __future__ import annotations

from tests.hostile import fuzzing
from tests.hostile.normal import KeystoredNormal, StatefsdNormal

SEED = 20261206
MIN_CASES = 300   # fewer means the daemon was too slow to fuzz meaningfully


def _fuzz_beside_a_normal_client(daemon, proto, normal, cases: int, budget: float) -> None:
    normal.start()
    try:
        findings = fuzzing.fuzz(daemon.socket, proto, SEED, cases, budget,
                                alive=lambda: daemon.proc.poll() is None)
    finally:
        normal.finish()
    tail = "\n".join(daemon.output().splitlines()[-15:])
    assert daemon.proc.poll() is None, f"{proto.name} died (exit {daemon.proc.returncode}):\n{tail}"
    assert findings.problems == [], f"{len(findings.problems)}+ findings after {findings.cases} cases " \
                                    f"(seed {SEED}):\n" + "\n".join(findings.problems)
    assert normal.problems == [], normal.problems
    assert findings.cases >= MIN_CASES and findings.replies > findings.cases // 2, findings
    assert len(normal.latencies) > 20, "the normal client barely ran"


def test_statefsd_survives_the_fuzzer_without_internal_errors_or_wrong_answers(statefsd):
    _fuzz_beside_a_normal_client(statefsd, fuzzing.STATEFSD, StatefsdNormal(statefsd.socket),
                                 cases=20000, budget=25.0)


def test_keystored_survives_the_fuzzer_without_internal_errors_or_wrong_answers(keystored):
    _fuzz_beside_a_normal_client(keystored, fuzzing.KEYSTORED, KeystoredNormal(keystored.socket),
                                 cases=20000, budget=15.0)
