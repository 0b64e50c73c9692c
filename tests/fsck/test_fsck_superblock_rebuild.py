"""Both superblock slots lost: fsck-statefs --repair rebuilds a superblock
from the identity copy and the log, and the image serves the same state."""

from __future__ import annotations

import json
import os

import pytest

from statefsd.storage import format as fmt
from statefsd.storage.blockdev import FileDevice
from statefsd.storage.engine import Engine, Mutation
from statefsd.storage.image import read_superblock
from statefsd.errors import CorruptImage

from fsck_images import digest, fixed_key, forge_superblock, fsck, make_image, mount, patch, put_each, state
from fsck_statefs.cli import run

VALUES = {f"cfg/{i:02d}": os.urandom(200 + 37 * i) for i in range(12)}


def _history(path: str, **kw) -> dict[str, bytes]:
    """Commits, a compaction (region 1 becomes active), commits after it
    (a put and a delete); returns the state."""
    put_each(path, VALUES, **kw)
    with mount(path, **kw) as e:
        e.compact()
        e.commit([Mutation("put", "after/compaction", b"new value")])
        e.commit([Mutation("delete", "cfg/03")])
    with FileDevice(path, read_only=True) as dev:
        assert read_superblock(dev)[0].active_region == 1
    return state(path, **kw)


def _destroy_slots(path: str, how: str) -> None:
    fill = bytes(fmt.BLOCK_SIZE) if how == "zeroed" else os.urandom(fmt.BLOCK_SIZE)
    for offset in fmt.SUPERBLOCK_OFFSETS:
        patch(path, offset, fill)


@pytest.mark.parametrize("redundancy", ["parity", "off"])
@pytest.mark.parametrize("how", ["zeroed", "garbage"])
def test_repair_rebuilds_lost_superblocks_and_the_image_serves_the_same_state(tmp_path, how, redundancy):
    path = make_image(tmp_path / "img", 4 << 20, redundancy=redundancy)
    before = _history(path)
    _destroy_slots(path, how)

    proc = fsck(path, "--repair")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "make log region 1 active" in proc.stdout
    assert state(path) == before
    with mount(path) as e:   # read-write, and new commits continue the log
        e.commit([Mutation("put", "after/rebuild", b"x")])
    assert state(path) == {**before, "after/rebuild": b"x"}
    again = json.loads(fsck(path, "--json").stdout)
    assert again["exit_code"] == 0, again["findings"]


def test_a_check_without_repair_names_the_command_and_dry_run_writes_nothing(tmp_path):
    path = make_image(tmp_path / "img", 4 << 20)
    _history(path)
    _destroy_slots(path, "zeroed")
    untouched = digest(path)

    proc = fsck(path)
    assert proc.returncode == 4
    assert f"run: fsck-statefs --repair {path}" in proc.stdout
    dry = fsck(path, "--repair", "--dry-run", "--json")
    rep = json.loads(dry.stdout)
    assert dry.returncode == 4 and rep["repair"]["dry_run"] and not rep["repair"]["performed"]
    assert any("identity copy" in step for step in rep["repair"]["planned"])
    assert any("write the rebuilt superblock to both slots" in step for step in rep["repair"]["planned"])
    assert digest(path) == untouched


def test_statefsd_refuses_lost_superblocks_and_names_the_fsck_command(tmp_path):
    path = make_image(tmp_path / "img", 4 << 20)
    put_each(path, VALUES)
    _destroy_slots(path, "zeroed")
    with pytest.raises(CorruptImage, match=f"run: fsck-statefs --repair {path}"):
        mount(path)


def test_an_encrypted_image_is_rebuilt_and_every_value_opens_with_its_key(tmp_path):
    path = make_image(tmp_path / "enc", 4 << 20, encryption="on")
    before = _history(path)   # the first mount records the key check, in the identity copy too
    _destroy_slots(path, "garbage")

    report = run(path, repair_image=True, key_provider=fixed_key)
    assert report.exit_code == 1, report.to_text()
    assert report.authentication == "verified"
    with FileDevice(path, read_only=True) as dev:
        sb, _ = read_superblock(dev)
        assert sb.encryption == fmt.ENCRYPTION_XCHACHA20POLY1305 and sb.key_check != bytes(16)
    assert state(path) == before
    with pytest.raises(Exception, match="does not match"):
        mount(path, key_provider=lambda sb: bytes(32))


@pytest.mark.parametrize("redundancy", ["parity", "off"])
def test_without_an_identity_copy_a_plaintext_image_is_rebuilt_under_a_fresh_uuid(tmp_path, redundancy):
    path = make_image(tmp_path / "img", 4 << 20, redundancy=redundancy)
    before = _history(path)
    with FileDevice(path, read_only=True) as dev:
        old_uuid = read_superblock(dev)[0].device_uuid
        copy_at = read_superblock(dev)[0].identity_copy_offset
    _destroy_slots(path, "zeroed")
    patch(path, copy_at, bytes(fmt.BLOCK_SIZE))

    proc = fsck(path, "--repair")
    assert proc.returncode == 1, proc.stdout
    assert "no identity copy" in proc.stdout and "checkpoints signed under the old uuid" in proc.stdout
    with FileDevice(path, read_only=True) as dev:
        sb, _ = read_superblock(dev)
        assert sb.device_uuid != old_uuid and fmt.REDUNDANCY_NAMES[sb.redundancy] == redundancy
        assert sb.active_region == 1
    assert state(path) == before


def test_a_format_2_0_image_is_rebuilt_with_the_2_0_layout(tmp_path):
    path = make_image(tmp_path / "img", 4 << 20, redundancy="off")
    with FileDevice(path, read_only=True) as dev:
        sb, _ = read_superblock(dev)
    # What a 2.0 mkfs left: regions reaching the last block, no identity copy.
    forge_superblock(path, regions=fmt.region_layout(sb.total_blocks, identity_copy=False), version_minor=0)
    patch(path, sb.identity_copy_offset, bytes(fmt.BLOCK_SIZE))
    before = _history(path)
    with FileDevice(path, read_only=True) as dev:
        layout = read_superblock(dev)[0].regions
    _destroy_slots(path, "zeroed")

    with pytest.raises(CorruptImage, match=f"run: fsck-statefs --repair {path}"):
        mount(path)      # no magic, no identity copy: the log's first record still marks a StateFS image
    assert fsck(path, "--repair").returncode == 1
    with FileDevice(path, read_only=True) as dev:
        assert read_superblock(dev)[0].regions == layout
    assert state(path) == before


def test_without_an_identity_copy_an_encrypted_image_is_not_rebuilt(tmp_path):
    path = make_image(tmp_path / "enc", 4 << 20, encryption="on")
    put_each(path, VALUES)
    with FileDevice(path, read_only=True) as dev:
        copy_at = read_superblock(dev)[0].identity_copy_offset
    _destroy_slots(path, "garbage")
    patch(path, copy_at, bytes(fmt.BLOCK_SIZE))
    untouched = digest(path)

    proc = fsck(path, "--repair", "--json")
    rep = json.loads(proc.stdout)
    assert proc.returncode == 4
    assert any("encrypted" in b and "restore the image from a copy" in b for b in rep["repair"]["blocked"])
    assert digest(path) == untouched


@pytest.mark.parametrize("later_mount", [False, True], ids=["same-mount", "compacting-mount"])
def test_a_compaction_cut_before_its_switch_is_not_taken_for_the_active_log(tmp_path, later_mount):
    from statefsd.storage.engine import Engine
    from statefsd.testing.simdev import Outcome, SimulatedDevice
    dev = SimulatedDevice(4 << 20)
    Engine.mkfs(dev)
    e = Engine.mount(dev)
    e.commit([Mutation("put", f"k/{i:03d}", bytes([i]) * 300) for i in range(100)])
    e.commit([Mutation("put", f"m/{i:03d}", bytes([i]) * 300) for i in range(100)])
    e.commit([Mutation("put", f"n/{i:03d}", bytes([i]) * 300) for i in range(100)])
    if later_mount:   # the compaction's records then carry a newer mount_gen than the old log's
        e.close()
        e = Engine.mount(SimulatedDevice.from_image(dev.image()))
        dev = e.device
    expected = {k: e.get(k) for k in e.list()}
    region1 = e.sb.regions[1][0] * fmt.BLOCK_SIZE
    mark = len(dev.trace)
    e.compact()
    writes = [op.index for op in dev.trace.ops[mark:] if op.kind == "write" and op.offset >= region1]
    assert len(writes) >= 3   # one write group per snapshot batch of 128 ops
    # The cut: two of the three snapshot groups landed, the third and the switch did not.
    point = next(dev.trace.crash_points(start=writes[1] + 1, stop=writes[1] + 1))
    crashed = point.device(Outcome.keep_all(len(point.pending)), record=False).image()
    path = str(tmp_path / "cut.img")
    with open(path, "wb") as f:
        f.write(crashed)
    _destroy_slots(path, "zeroed")

    proc = fsck(path, "--repair")
    assert proc.returncode == 1, proc.stdout
    assert "cut before its superblock switch" in proc.stdout
    assert state(path) == expected


def test_the_log_of_an_earlier_file_system_on_the_device_is_not_rebuilt_as_the_active_one(tmp_path):
    path = make_image(tmp_path / "img", 4 << 20)
    _history(path)
    with mount(path) as e:      # many mounts: the old logs carry high mount generations
        for i in range(6):
            e.commit([Mutation("put", f"old/{i}", b"x")])
    for _ in range(5):
        mount(path).close()
    with FileDevice(path) as dev:   # formatted anew; the old logs' bytes stay where mkfs does not write
        Engine.mkfs(dev, redundancy="parity")
    put_each(path, {"fresh": b"1"})
    expected = state(path)
    _destroy_slots(path, "zeroed")

    assert fsck(path, "--repair").returncode == 1
    assert state(path) == expected


def test_a_rebuild_cut_by_power_loss_leaves_a_valid_slot_or_lost_slots_that_rebuild_the_same(tmp_path):
    from fsck_statefs import rebuild
    from statefsd.testing.simdev import SimulatedDevice
    path = make_image(tmp_path / "img", 2 << 20)
    expected = _history(path)
    _destroy_slots(path, "garbage")
    with open(path, "rb") as f:
        dev = SimulatedDevice.from_image(f.read())
    planned = rebuild.plan_rebuild(dev).sb
    mark = len(dev.trace)
    rebuild.write_superblock(dev, planned)
    point = next(dev.trace.crash_points(start=mark + 2, stop=mark + 2))   # both slot writes pending
    assert len(point.pending) == 2
    redone = 0
    for outcome in point.outcomes(limit=40, rng=7):
        crashed = point.device(outcome, record=False)
        if rebuild.slots_lost(crashed):
            assert rebuild.plan_rebuild(crashed).sb == planned
            rebuild.write_superblock(crashed, planned)
            redone += 1
        with Engine.mount(crashed, key_provider=fixed_key) as e:
            assert {k: e.get(k) for k in e.list()} == expected
    assert redone


def test_damage_inside_the_newest_compaction_falls_back_to_the_older_log_and_reports_the_loss(tmp_path):
    path = make_image(tmp_path / "img", 4 << 20, redundancy="off")
    with mount(path) as e:
        for prefix in "kmn":   # three snapshot batches of 128 ops: three compaction groups
            e.commit([Mutation("put", f"{prefix}/{i:03d}", bytes([i]) * 300) for i in range(100)])
        before_compaction = {k: e.get(k) for k in e.list()}
        e.compact()
        e.commit([Mutation("put", "after/compaction", b"lost with the damage")])
        start = e.sb.active_extent[0]
    with FileDevice(path, read_only=True) as dev:
        second_group = next(off for off in range(start + fmt.GROUP_ALIGN, start + (1 << 20), fmt.GROUP_ALIGN)
                            if fmt.unpack_header(dev.read(off, fmt.HEADER_SIZE)).group == 2)
    patch(path, second_group + fmt.HEADER_SIZE + 100, b"rot")
    _destroy_slots(path, "zeroed")

    check_only = fsck(path)
    assert check_only.returncode == 4 and f"damaged at byte offset {second_group}" in check_only.stdout
    proc = fsck(path, "--repair", "--json")
    rep = json.loads(proc.stdout)
    assert rep["exit_code"] == 1
    assert any("lost in the rebuild" in f["reason"] and "after its copy of region 0 is lost" in f["reason"]
               for f in rep["findings"])
    assert state(path) == before_compaction
