"""The media-fault campaign: it passes on the engine and catches each broken variant."""

import random
import subprocess
import sys

import pytest

from statefsd.storage import format as fmt
from statefsd.testing.campaign import mediafaults as mf
from statefsd.testing.simdev import SimulatedDevice


@pytest.fixture(scope="module")
def clean_images():
    return {red: mf.build_scenarios(red)[0] for red in ("parity", "off")}


def _last_group_faults(sc, kinds, count=12):
    """Faults on the sectors just below the log end: the last groups, where
    damage looks most like a torn tail."""
    dev = SimulatedDevice(image=sc.image, record=False)
    end = mf._log_end(dev)
    return [mf.Fault(kind, end - (i + 1) * fmt.GROUP_ALIGN) for i in range(count) for kind in kinds]


def test_the_engine_serves_or_refuses_every_damaged_image_of_a_sample(clean_images):
    rng = random.Random(7)
    for sc in clean_images.values():
        faults = rng.sample(mf.faults_for(sc, rng), 150) + _last_group_faults(sc, mf.FAULTS)
        faults += [mf.Fault("truncate", size) for size in (512, 4608, 8192)]   # inside the superblocks
        out = mf.run_chunk((sc, faults, "engine", 1))
        assert out.violations == []
        assert out.states > 100
        if sc.redundancy == "off":
            assert out.refused > 0          # damage below the floor is refused
        assert out.repaired > 0


def test_a_reader_that_ignores_the_durable_floor_is_caught(clean_images):
    sc = clean_images["off"]
    out = mf.run_chunk((sc, _last_group_faults(sc, ("zero", "garbage")), "floor-ignored", 1))
    assert any("other than the latest acknowledged" in v for v in out.violations), out.violations


def test_a_reader_that_ignores_parity_is_caught(clean_images):
    sc = clean_images["parity"]
    out = mf.run_chunk((sc, _last_group_faults(sc, ("bitflip",)), "redundancy-ignored", 1))
    assert any("refused, not repaired" in v for v in out.violations), out.violations


def test_faults_damage_exactly_what_they_name():
    image = random.Random(3).randbytes(4096)   # 8 distinct sectors
    older = bytes(4096)
    rng = random.Random(1)
    flipped = mf.Fault("bitflip", 512).apply(image, older, rng)
    assert sum(bin(a ^ b).count("1") for a, b in zip(image, flipped)) == 1
    assert mf.Fault("zero", 1024).apply(image, older, rng)[1024:1536] == bytes(512)
    assert mf.Fault("rollback", 0).apply(image, older, rng)[:512] == bytes(512)
    swapped = mf.Fault("swap", 0).apply(image, older, rng)
    assert swapped[:512] == image[512:1024] and swapped[512:1024] == image[:512]
    assert mf.Fault("truncate", 2048).apply(image, older, rng) == image[:2048]
    assert mf.Fault("rollback", 0).apply(image, image, rng) is None   # no change: not a state


def test_the_command_line_ends_with_the_count_of_states_and_violations():
    out = subprocess.run([sys.executable, "-m", "statefsd.testing.campaign.mediafaults", "--images", "1",
                          "--scenario", "compacted", "--redundancy", "off", "--workers", "2"],
                         capture_output=True, text=True, timeout=600)
    last = out.stdout.strip().splitlines()[-1]
    assert out.returncode == 0, out.stdout + out.stderr
    assert last.startswith("media-fault states: ") and last.endswith(", violations: 0")
    assert int(last.split()[2].rstrip(",")) > 500
