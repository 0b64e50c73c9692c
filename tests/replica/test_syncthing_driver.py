"""The Syncthing driver against a real instance on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from statefsd.errors import Code, InvalidArgument, PeerUnavailable
from statefsd.replica import syncthing
from tests.replica.syncthing_fixtures import free_ports, start_cluster, stop_cluster, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    instances = start_cluster(str(tmp_path_factory.mktemp("syncthing")), ("solo",))
    try:
        yield instances["solo"]
    finally:
        stop_cluster(instances)


def test_a_started_instance_talks_only_on_loopback_and_reports_nothing(solo):
    options = solo.st.config()["options"]
    assert options["listenAddresses"] == [f"tcp://127.0.0.1:{solo.listen_port}"]
    assert not any(options[k] for k in ("globalAnnounceEnabled", "localAnnounceEnabled", "relaysEnabled",
                                       "natEnabled", "crashReportingEnabled", "autoUpgradeIntervalH"))
    assert options["urAccepted"] == -1
    assert solo.st.folders() == []
    assert solo.st.url == f"http://127.0.0.1:{solo.gui_port}"
    assert solo.st.version().startswith("v1.")


def test_the_api_url_and_key_are_read_from_the_instance_home(solo):
    url, key = syncthing.read_home(solo.home)
    assert syncthing.Syncthing(url, key).device_id() == solo.id


def test_a_missing_home_names_what_to_give_instead(tmp_path):
    with pytest.raises(InvalidArgument) as exc:
        syncthing.read_home(str(tmp_path))
    assert "--api-key" in exc.value.hint


def test_device_ids_are_checked_and_normalised_by_syncthing(solo):
    assert solo.st.normalize_device_id(solo.id.replace("-", "").lower()) == solo.id
    with pytest.raises(InvalidArgument) as exc:
        solo.st.normalize_device_id("ABCDEFG-HIJKLMN")
    assert "not a Syncthing device id" in exc.value.message


def test_an_unreachable_syncthing_api_is_epeer_with_a_hint():
    [port] = free_ports(1)
    with pytest.raises(PeerUnavailable) as exc:
        syncthing.Syncthing(f"http://127.0.0.1:{port}", "key", timeout=2).ping()
    assert exc.value.code == Code.EPEER and "start Syncthing" in exc.value.hint


def test_a_wrong_api_key_is_epeer_naming_the_key(solo):
    with pytest.raises(PeerUnavailable) as exc:
        syncthing.Syncthing(solo.st.url, "not-the-key").ping()
    assert exc.value.code == Code.EPEER and "API key" in exc.value.hint


def test_a_stopped_or_killed_instance_frees_its_home_for_a_new_one_at_once(tmp_path):
    home = str(tmp_path / "home")
    gui, listen = free_ports(2)
    proc, st = syncthing.start_instance(home, gui, listen)
    my_id = st.device_id()
    for kill in (True, False):
        syncthing.stop_instance(proc, kill=kill)
        with pytest.raises(PeerUnavailable):
            st.ping()
        # The database lock is free: the same home starts again right away.
        proc, st = syncthing.start_instance(home, gui, listen)
        assert st.device_id() == my_id
    syncthing.stop_instance(proc)


def test_adding_a_known_device_keeps_its_name_and_changes_only_a_given_address(solo):
    other = "MFZWI3D-BONSGYC-YLTMRWG-C43ENR5-QXGZDMM-FZWI3DP-BONSGYY-LTMRWAD"
    solo.st.add_device(other, "tcp://127.0.0.1:1", name="the user's laptop")
    solo.st.add_device(other, None, name="statefs peer")
    assert (solo.st.device(other)["name"], solo.st.device(other)["addresses"]) == \
        ("the user's laptop", ["tcp://127.0.0.1:1"])
    solo.st.add_device(other, "tcp://127.0.0.1:2")
    assert solo.st.device(other)["addresses"] == ["tcp://127.0.0.1:2"]
    solo.st.remove_device(other)
    assert solo.st.device(other) is None


def test_a_second_instance_on_a_home_in_use_fails_naming_the_other_one(tmp_path):
    home = str(tmp_path / "home")
    proc, st = syncthing.start_instance(home, *free_ports(2))
    try:
        with pytest.raises(PeerUnavailable) as exc:
            syncthing.start_instance(home, *free_ports(2), timeout=2)
        assert "Error opening database" in exc.value.message and "another Syncthing" in exc.value.hint
        st.ping()      # the running one is untouched
    finally:
        syncthing.stop_instance(proc)


def test_the_module_starts_an_instance_that_outlives_the_command(tmp_path):
    home = str(tmp_path / "home")
    gui, listen = free_ports(2)
    proc = subprocess.run([sys.executable, "-m", "statefsd.replica.syncthing", "--home", home, "--gui-port",
                           str(gui), "--listen-port", str(listen)], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr
    said = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    try:
        st = syncthing.Syncthing(*syncthing.read_home(home))
        assert st.device_id() == said["device"] and st.url == said["url"]
    finally:
        os.killpg(int(said["pid"]), signal.SIGTERM)
    wait_for(lambda: syncthing.live_members(int(said["pid"])) == [], 10, "the instance to stop")
