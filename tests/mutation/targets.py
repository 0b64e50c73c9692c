"""What scripts/mutation mutates and which tests judge each module.

Each target names a module, optionally the top-level functions to mutate
(None: the whole module), and two test selections run with pytest -x:
``fast`` (the tests written to pin this module's decisions; a mutant they
kill costs a second or two) and ``broad`` (run only for mutants the fast
stage left alive). Slow property tests (the engine model, the fsck
hypothesis mutations, daemons, QEMU) are left out on purpose: the run is by
hand, but it must finish in minutes.
"""

from __future__ import annotations

from typing import NamedTuple


class Target(NamedTuple):
    module: str
    functions: frozenset[str] | None
    fast: tuple[str, ...]
    broad: tuple[str, ...]


# The format module's validation: everything that decides whether bytes
# read from the device are acceptable. Encoders and constants are out.
FORMAT_VALIDATION = frozenset({
    "decode_superblock", "has_superblock_magic", "superblock_layout_problem", "header_problem",
    "record_crc_ok", "record_crc", "record_magic_at",
    "decode_prepare", "_is_utf8", "decode_commit", "decode_checkpoint", "has_identity_copy",
    # the transaction rule decode_prepare applies to the ops it read
    "transaction_problem", "path_problem", "op_problem",
})

_BROAD = ("tests/engine/test_engine_durable_floor.py",
          "tests/format/test_format_spec_reader_v21.py",
          "tests/engine/test_engine_recovery.py",
          "tests/format/test_format_crafted_logs.py",
          "tests/format/test_format_spec_reader.py",
          # slow, and timing-sensitive under the load of two mutants at once
          "--deselect", "tests/engine/test_engine_recovery.py::test_commits_go_on_during_compaction_and_none_is_lost",
          "--deselect", "tests/engine/test_engine_recovery.py::test_concurrent_commits_share_flushes",
          # a hypothesis property test: 20 s alone
          "--deselect", "tests/format/test_format_spec_reader.py::test_any_single_bit_flip_in_the_log_gets_the_same_verdict_from_both")

TARGETS = {
    "format": Target("statefsd/storage/format.py", FORMAT_VALIDATION,
                     ("tests/format/test_format_validation.py", "tests/format/test_transaction_rule.py"),
                     ("tests/engine/test_replay_rules.py", *_BROAD)),
    "replay": Target("statefsd/storage/replay.py", None,
                     ("tests/engine/test_replay_rules.py", "tests/engine/test_logscan_parity.py"),
                     _BROAD),
    "logscan": Target("statefsd/storage/logscan.py", None,
                      ("tests/engine/test_logscan_end.py", "tests/engine/test_logscan_parity.py"),
                      ("tests/engine/test_replay_rules.py", *_BROAD)),
}
