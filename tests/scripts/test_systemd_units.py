"""The systemd units in scripts/systemd, checked by systemd's own verifier."""

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "scripts" / "systemd"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (scripts/setup installs the systemd package)")


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)  # directives may repeat
    parser.optionxform = str
    parser.read(UNITS / name)
    return parser


def installed_copy(tmp_path: Path, name: str) -> Path:
    """The unit as installed, with ExecStart pointing at this checkout's
    programs (verify insists that the binary exists)."""
    text = (UNITS / name).read_text().replace("/usr/local/bin/", f"{REPO}/.venv/bin/")
    path = tmp_path / name
    path.write_text(text)
    return path


@needs_analyze
@pytest.mark.parametrize("name", ["keystored.service", "statefsd.service"])
def test_systemd_analyze_verify_accepts_the_unit_without_a_warning(tmp_path, name):
    if not (REPO / ".venv" / "bin" / name.split(".")[0]).exists():
        pytest.skip(f".venv/bin/{name.split('.')[0]} is missing: run scripts/setup")
    path = installed_copy(tmp_path, name)
    result = subprocess.run([ANALYZE, "verify", "--man=no", str(path)], capture_output=True, text=True,
                            timeout=120)
    if result.returncode and "Failed to" in result.stderr and "bus" in result.stderr.lower():
        pytest.skip(f"systemd-analyze verify cannot run in this container: {result.stderr.strip()}")
    assert result.returncode == 0 and result.stderr == "", result.stderr


@needs_analyze
@pytest.mark.parametrize("name", ["keystored.service", "statefsd.service"])
def test_systemd_analyze_security_rates_the_unit_safe(tmp_path, name):
    path = installed_copy(tmp_path, name)
    result = subprocess.run([ANALYZE, "security", "--offline=yes", "--threshold=20", str(path)],
                            capture_output=True, text=True, timeout=120)
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip(f"this systemd-analyze has no offline security check: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SAFE" in result.stdout, result.stdout[-500:]


@pytest.mark.parametrize("name, program, socket", [
    ("keystored.service", "keystored", "/run/statefs-keys/keystored.sock"),
    ("statefsd.service", "statefsd", "/run/statefs/statefsd.sock"),
])
def test_units_are_notify_type_unprivileged_with_sockets_under_run(name, program, socket):
    service = unit(name)["Service"]
    assert service["Type"] == "notify"
    assert service["User"] not in ("", "root") and service["NoNewPrivileges"] == "yes"
    assert service["CapabilityBoundingSet"] == "" and service["ProtectSystem"] == "strict"
    assert service["RestrictAddressFamilies"] == "AF_UNIX"
    assert service["ExecStart"].startswith(f"/usr/local/bin/{program} ")
    assert f"--socket {socket}" in service["ExecStart"]


def test_statefsd_reaches_keystored_as_the_user_keystored_allows():
    keystored = unit("keystored.service")["Service"]
    statefsd = unit("statefsd.service")["Service"]
    assert f"--allow {statefsd['User']}:statefs.*" in keystored["ExecStart"]
    assert "--keystore-socket /run/statefs-keys/keystored.sock" in statefsd["ExecStart"]
    users = (UNITS / "statefs.sysusers.conf").read_text().split()
    assert statefsd["User"] in users and keystored["User"] in users
