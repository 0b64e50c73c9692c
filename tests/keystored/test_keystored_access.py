"""Access control: SO_PEERCRED uids, label patterns, refusals that are logged."""

from __future__ import annotations

import json
import os

import pytest

from keystored.client import KeystoreClient
from statefsd.errors import AccessDenied, Code, KeyUnavailable, StateFSError

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to uid 65534 needs root")


def _try_ops(socket_path: str, labels: list[str]) -> dict:
    """In the child: what each op answers, as 'ok' or the error name."""
    out = {}
    with KeystoreClient(socket_path) as ks:
        for name, call in [("public_key", ks.public_key)] + [
            (f"derive {label}", lambda label=label: ks.derive(label)) for label in labels
        ] + [(f"sign {label}", lambda label=label: ks.sign(label, b"m")) for label in labels]:
            try:
                call()
                out[name] = "ok"
            except StateFSError as exc:
                out[name] = exc.code.name
    return out


def test_label_outside_the_allow_list_is_refused_and_logged(launcher, tmp_path):
    log = tmp_path / "keystored.log"
    daemon = launcher.start("--log", str(log))
    with daemon.client() as ks:
        with pytest.raises(AccessDenied) as err:
            ks.derive("secret.other")
        assert err.value.code == Code.EACCES
        assert "uid 0 may not derive with label 'secret.other'" in str(err.value)
        with pytest.raises(AccessDenied):
            ks.sign("secret.other", b"m")
        assert len(ks.derive("statefs.anything")) == 32  # the connection still works
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(e["component"] == "keystored" for e in events)
    denied = [e["fields"] for e in events if e["event"] == "access_denied"]
    assert [(e["op"], e["label"], e["uid"]) for e in denied] == [("derive", "secret.other", 0),
                                                                 ("sign", "secret.other", 0)]
    assert all(e["pid"] > 0 for e in denied)


@needs_root
def test_other_uid_is_refused_derive_and_sign_but_may_read_the_public_key(keystored, helpers):
    result = helpers.run_as_uid(NOBODY, lambda: _try_ops(keystored.socket, ["statefs.data"]))
    assert result == {"public_key": "ok", "derive statefs.data": "EACCES", "sign statefs.data": "EACCES"}
    denied = keystored.wait_log_events("access_denied", 2)
    assert {(e["fields"]["op"], e["fields"]["uid"], e["fields"]["gid"]) for e in denied} == {("derive", NOBODY, NOBODY), ("sign", NOBODY, NOBODY)}


@needs_root
def test_allow_list_grants_another_uid_exactly_its_labels(launcher, helpers):
    daemon = launcher.start("--allow", f"{NOBODY}:app.one,app.pre*", "--allow", "0:statefs.data")
    labels = ["app.one", "app.prefix.x", "app.two", "statefs.data"]
    as_nobody = helpers.run_as_uid(NOBODY, lambda: _try_ops(daemon.socket, labels))
    assert as_nobody == {
        "public_key": "ok",
        "derive app.one": "ok", "sign app.one": "ok",
        "derive app.prefix.x": "ok", "sign app.prefix.x": "ok",
        "derive app.two": "EACCES", "sign app.two": "EACCES",
        "derive statefs.data": "EACCES", "sign statefs.data": "EACCES",
    }
    # An explicit list replaces the default: root now has statefs.data only.
    with daemon.client() as ks:
        assert len(ks.derive("statefs.data")) == 32
        with pytest.raises(AccessDenied):
            ks.derive("statefs.meta")
        with pytest.raises(AccessDenied):
            ks.derive("app.one")


@needs_root
def test_the_same_label_gives_the_same_key_to_every_allowed_uid(launcher, helpers):
    daemon = launcher.start("--allow", f"{NOBODY}:shared", "--allow", "0:shared")

    def derive() -> str:
        with KeystoreClient(daemon.socket) as ks:
            return ks.derive("shared", b"c").hex()

    with daemon.client() as ks:
        assert helpers.run_as_uid(NOBODY, derive) == ks.derive("shared", b"c").hex()


def test_unreachable_socket_raises_key_unavailable_naming_the_path(sock_dir):
    path = os.path.join(sock_dir, "nobody-listens.sock")
    with pytest.raises(KeyUnavailable) as err:
        KeystoreClient(path, timeout=1).derive("statefs.data")
    assert err.value.code == Code.EKEY
    assert path in str(err.value) and "cannot reach keystored" in str(err.value)


def test_stopped_keystored_is_reported_as_key_unavailable(keystored):
    ks = keystored.client()
    ks.ping()
    assert keystored.stop() == 0
    with pytest.raises(KeyUnavailable) as err:
        ks.derive("statefs.data")
    assert keystored.socket in str(err.value)


@pytest.mark.parametrize("spec", ["nolabel", "0:", ":statefs.*", "0:bad label", "no-such-user-xyz:statefs.*"])
def test_malformed_allow_option_is_a_usage_error(launcher, spec):
    refused = launcher.fail("--allow", spec)
    assert refused.proc.returncode == Code.EUSAGE
    assert "--allow" in refused.stderr


@needs_root
@pytest.mark.parametrize("fields", [
    {"op": "derive", "label": "statefs." + "x" * 60_000},   # over the label limit
    {"op": "derive", "label": "other." + "x" * 50},          # a label uid 65534 may not use
    {"op": "sign", "label": "statefs.sb", "message": "y" * 60_000},   # text, not bytes
], ids=["long-label", "denied-label", "wrong-type"])
def test_a_flood_of_bad_requests_from_a_disallowed_uid_grows_the_log_by_a_bounded_amount(
        launcher, helpers, tmp_path, fields):
    from statefsd.shared.audit import BURST, EXCERPT_CHARS
    log = tmp_path / "keystored.log"
    ks = launcher.start("--log", str(log))
    before, before_lines = log.stat().st_size, len(log.read_text().splitlines())
    requests = 10 * BURST
    frame = helpers.request(v=1, **fields)
    replies = helpers.run_as_uid(NOBODY, lambda: [
        r["error"]["name"] if r else None for r in helpers.exchange(ks.socket, *[frame] * requests)])
    assert len(replies) == requests and None not in replies and "EINTERNAL" not in replies
    grown = log.stat().st_size - before
    sent = requests * len(frame)
    assert grown < BURST * 4 * EXCERPT_CHARS, (grown, sent)
    assert len(log.read_text().splitlines()) <= before_lines + BURST
    assert ks.stop() == 0
    events = [json.loads(line) for line in log.read_text().splitlines()]
    suppressed = [e["fields"] for e in events if e["event"] == "suppressed"]
    assert [(s["uid"], s["count"]) for s in suppressed] == [(NOBODY, requests - BURST)]
