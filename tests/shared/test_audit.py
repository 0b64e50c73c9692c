"""The audit journal both daemons write (statefsd/shared/audit.py)."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import stat

import pytest

from statefsd.errors import InvalidArgument
from statefsd.shared.audit import AuditLog


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
