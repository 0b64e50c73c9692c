"""The audit journal both daemons write (statefsd/shared/audit.py)."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import stat
import time

import pytest

from statefsd.errors import InvalidArgument
from statefsd.shared.audit import EXCERPT_CHARS, STRUCT_CHARS, AuditLog


def test_every_line_names_its_component_and_keeps_fields_apart(tmp_path):
    path = str(tmp_path / "audit.jsonl")
    statefsd = AuditLog(path, component="statefsd")
    keystored = AuditLog(path, component="keystored", option="--log")
    statefsd("mount", image="a.img", ts="not the timestamp", component="not the component")
    keystored.event("access_denied", op="derive", uid=0, key=b"\x01\xff")
    statefsd.close()
    keystored.close()
    lines = [json.loads(line) for line in open(path)]
    assert [list(line) for line in lines] == [["ts", "component", "event", "fields"]] * 2
    assert [(line["component"], line["event"]) for line in lines] == [("statefsd", "mount"),
                                                                     ("keystored", "access_denied")]
    assert lines[0]["fields"] == {"image": "a.img", "ts": "not the timestamp", "component": "not the component"}
    assert lines[1]["fields"] == {"op": "derive", "uid": 0, "key": "01ff"}  # bytes as hex
    stamp = dt.datetime.strptime(lines[0]["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc)
    assert abs((dt.datetime.now(dt.timezone.utc) - stamp).total_seconds()) < 60
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o007 == 0


def test_without_a_path_lines_go_to_the_given_stream_or_nowhere():
    stream = io.StringIO()
    log = AuditLog(None, component="keystored", stream=stream)
    log.event("stopped", socket="/run/k.sock")
    log.close()
    assert not stream.closed  # a borrowed stream stays open
    assert json.loads(stream.getvalue())["fields"] == {"socket": "/run/k.sock"}
    assert not log.is_file
    AuditLog(None, component="statefsd")("shutdown", signal="SIGTERM")  # discarded, no error


def test_a_journal_in_a_missing_directory_is_einval_naming_mkdir(tmp_path):
    with pytest.raises(InvalidArgument, match="does not exist") as err:
        AuditLog(str(tmp_path / "nodir" / "k.log"), component="keystored", option="--log")
    assert "mkdir -p" in err.value.hint


def test_a_journal_that_is_a_directory_names_the_option_to_fix(tmp_path):
    with pytest.raises(InvalidArgument) as err:
        AuditLog(str(tmp_path), component="keystored", option="--log")
    assert "give --log a file" in err.value.hint


def _lines(path):
    return [json.loads(line) for line in open(path)]


def test_long_input_is_logged_as_a_bounded_excerpt_that_says_it_was_cut(tmp_path):
    path = str(tmp_path / "audit.jsonl")
    log = AuditLog(path, component="statefsd")
    log("refused", message="x" * 2_500_000, key=b"\xff" * 100_000, op="\udcff" * 50_000,
        summary={"n": list(range(100_000))}, uid=7, short="kept")
    log.close()
    # a lone surrogate escapes to six characters (\udcff); the input was over 2.5 MB
    assert os.path.getsize(path) < 3 * 6 * EXCERPT_CHARS + 2 * STRUCT_CHARS
    (line,) = _lines(path)
    fields = line["fields"]
    assert fields["message"] == "x" * EXCERPT_CHARS
    assert fields["key"] == "ff" * (EXCERPT_CHARS // 2)
    assert fields["truncated"] == {"message": 2_500_000, "key": 200_000, "op": 50_000,
                                   "summary": len(json.dumps({"n": list(range(100_000))}))}
    assert fields["short"] == "kept" and fields["uid"] == 7


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_flood_of_one_event_from_one_uid_is_cut_to_a_burst_and_one_suppressed_line(tmp_path):
    path = str(tmp_path / "audit.jsonl")
    clock = FakeClock()
    log = AuditLog(path, component="keystored", burst=5, window=10.0, clock=clock)
    for _ in range(1000):
        log.event("bad_request", uid=65534, message="junk")
    log.event("bad_request", uid=0, message="root's own mistake")  # another uid: its own budget
    log.event("access_denied", uid=65534)                          # another event: its own budget
    clock.now += 10.0
    log.event("bad_request", uid=65534, message="next window")
    log.close()
    lines = _lines(path)
    assert [(e["event"], e["fields"].get("uid")) for e in lines] == (
        [("bad_request", 65534)] * 5 + [("bad_request", 0), ("access_denied", 65534),
                                        ("suppressed", 65534), ("bad_request", 65534)])
    assert lines[7]["fields"] == {"event": "bad_request", "uid": 65534, "count": 995, "window_s": 10.0}


def test_suppressed_lines_are_summed_up_when_the_window_ends_even_if_nothing_else_is_logged(tmp_path):
    path = str(tmp_path / "audit.jsonl")
    log = AuditLog(path, component="statefsd", burst=2, window=0.2)
    for _ in range(50):
        log("refused", uid=65534, code="EPROTO")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(_lines(path)) < 3:
        time.sleep(0.02)
    lines = _lines(path)
    assert [e["event"] for e in lines] == ["refused", "refused", "suppressed"]
    assert lines[2]["fields"]["count"] == 48
    log.close()
    assert len(_lines(path)) == 3


def test_close_writes_the_count_of_a_window_still_open(tmp_path):
    path = str(tmp_path / "audit.jsonl")
    log = AuditLog(path, component="statefsd", burst=1, window=3600)
    for _ in range(4):
        log("txn_abandoned", uid=1000)
    log.close()
    assert [(e["event"], e["fields"].get("count")) for e in _lines(path)] == [
        ("txn_abandoned", None), ("suppressed", 3)]
