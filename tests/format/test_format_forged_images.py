"""Forged images built with format.py's encoders: a write group that never
closes, and a transaction whose chunks lie far apart. Whatever the image
holds, mount and fsck stay bounded in memory and reads in proportion to
the value read, and a forgery is reported as corruption, never as clean."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from statefsd.errors import CorruptImage
from statefsd.storage import format as fmt
from statefsd.storage.blockdev import FileDevice, create_image
from statefsd.storage.engine import Engine
from tests.daemon.harness import REPO, env_with_repo
from tests.format import spec_reader as sr
from tests.format.test_format_crafted_logs import Log, prepare_payload, put


def _image_with_one_key(path: str, size: int) -> str:
    create_image(path, size)
    with FileDevice(path) as dev:
        Engine.mkfs(dev)
    with Engine.mount(FileDevice(path)) as e:
        e.put("honest", b"committed before the forgery")
    return path


def _append_group_that_never_closes(path: str, payload_len: int, nbytes: int) -> int:
    """Records of one group, valid CRCs and numbering, none with GROUP_END,
    written at the log end; returns where the group starts."""
    with Engine.mount(FileDevice(path, read_only=True), read_only=True) as e:
        sb, pos = e.sb, e.log.position
    payload = bytes(payload_len)
    records = bytearray()
    seq = pos.seq
    while len(records) < nbytes:
        records += fmt.pack_record(fmt.PAYLOAD, flags=0, epoch=sb.log_epoch, group=pos.group, seq=seq,
                                   mount_gen=sb.generation + 1, txn_id=pos.next_txn, payload=payload)
        seq += 1
    with open(path, "r+b") as f:
        f.seek(pos.offset)
        f.write(records)
    return pos.offset


def test_a_group_running_past_the_group_cap_is_corruption_for_mount_fsck_and_the_spec_reader(tmp_path):
    path = _image_with_one_key(str(tmp_path / "forged.img"), 80 << 20)
    start = _append_group_that_never_closes(path, 32 << 10, fmt.MAX_GROUP_BYTES + (1 << 20))

    ours = sr.read_image(path)
    assert ours["outcome"] == "corruption" and ours["corrupt"]
    assert ours["state"] == {"honest": b"committed before the forgery"}

    with pytest.raises(CorruptImage):
        Engine.mount(FileDevice(path))
    with Engine.mount(FileDevice(path, read_only=True), read_only=True) as e:
        assert e.get("honest") == b"committed before the forgery"
        replay = e.info()["replay"]
    assert replay["findings"] == {"corruption": 1} and replay["log_end"] == start

    fsck = subprocess.run([sys.executable, "-m", "fsck_statefs", path], cwd=REPO, env=env_with_repo(),
                          capture_output=True, text=True, timeout=120)
    assert fsck.returncode == 4, fsck.stdout + fsck.stderr
    assert f"ERROR corruption   offset {start}" in fsck.stdout
    assert "no writer writes such a group" in fsck.stdout


_PEAK = """
import json, sys
from statefsd.storage.blockdev import FileDevice
from statefsd.storage.engine import Engine
from fsck_statefs.cli import main
what, path = sys.argv[1:]
if what == "mount":
    try:
        Engine.mount(FileDevice(path, read_only=True), read_only=True).close()
    except Exception:
        pass
else:
    main([path])
# VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec
print(json.dumps(next(int(line.split()[1]) // 1024 for line in open("/proc/self/status")
                      if line.startswith("VmHWM:"))))
"""


def _peak_mib(what: str, path: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PEAK, what, path], cwd=REPO, env=env_with_repo(),
                         capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("what", ["mount", "fsck"])
def test_a_group_of_tiny_records_that_never_closes_costs_mount_and_fsck_bounded_memory(tmp_path, what):
    """Header-only records, half a million of them, before the group cap:
    kept as records they cost about 300 MiB."""
    clean = _image_with_one_key(str(tmp_path / "clean.img"), 80 << 20)
    forged = _image_with_one_key(str(tmp_path / "forged.img"), 80 << 20)
    _append_group_that_never_closes(forged, 0, fmt.MAX_GROUP_BYTES + (1 << 20))
    baseline, peak = _peak_mib(what, clean), _peak_mib(what, forged)
    assert peak - baseline < 48, (baseline, peak)


class CountingDevice(FileDevice):
    """A FileDevice that counts the bytes read from it."""

    bytes_read = 0

    def read(self, offset: int, length: int) -> bytes:
        self.bytes_read += length
        return super().read(offset, length)


def test_a_value_whose_chunks_a_forged_transaction_spread_apart_is_read_chunk_by_chunk(tmp_path):
    path = _image_with_one_key(str(tmp_path / "spread.img"), 48 << 20)
    L = Log(open(path, "rb").read())
    txn, C = L.t + 1, sr.CHUNK
    near, far = bytes(range(256)) * (2 * C // 256), b"f" * (8 << 20)    # 2 chunks; 128 chunks
    hn, hf = sr.path_hash(b"near"), sr.path_hash(b"far")
    recs = [L.rec(sr.PREPARE, txn, prepare_payload([put("near", near), put("far", far)])),
            L.rec(sr.PAYLOAD, txn, near[:C], phash=hn, chunk=0, op=0)]
    recs += [L.rec(sr.PAYLOAD, txn, far[i:i + C], phash=hf, chunk=i // C, op=1) for i in range(0, len(far), C)]
    recs.append(L.rec(sr.PAYLOAD, txn, near[C:], phash=hn, chunk=1, op=0))   # 8 MiB after chunk 0
    L.commit(txn, recs)
    with open(path, "wb") as f:
        f.write(L.img)

    device = CountingDevice(path, read_only=True)
    with Engine.mount(device, read_only=True) as e:
        device.bytes_read = 0
        assert e.get("near") == near
        assert device.bytes_read < 4 * len(near), device.bytes_read    # not the 8 MiB between
        assert e.get("far") == far
