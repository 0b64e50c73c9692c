"""A small driver for Syncthing's REST API, and a way to start an instance.

StateFS never speaks a network protocol of its own to peers: Syncthing
carries the outbox (sealed files only) between devices that know each other
by their certificate hashes over mutual TLS. This module is the one place
that talks to Syncthing; everything else calls these methods.

Written against Debian's syncthing 1.19 (``/rest/config/...`` object
endpoints, ``/rest/cluster/pending/folders``). An API that does not answer
or refuses the key is :class:`PeerUnavailable` (EPEER) with a hint naming
the next step.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from statefsd.errors import InvalidArgument, NotFound, PeerUnavailable

FOLDER_TYPES = ("sendonly", "receiveonly", "sendreceive")
# Syncthing puts this marker directory in every folder root and stops the
# folder (error "folder marker missing") when it is gone: a wiped store is
# recognised by its absence.
MARKER = ".stfolder"


@dataclass(frozen=True)
class Completion:
    """How far one device is with one folder, as Syncthing sees it."""

    completion: float     # percent, 0-100
    need_bytes: int       # bytes the device still lacks
    need_items: int       # files the device still lacks
    need_deletes: int
    global_bytes: int     # size of the folder's global state


class Syncthing:
    """One Syncthing instance, reached at ``url`` with its GUI API key."""

    def __init__(self, url: str, api_key: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._my_id: str | None = None

    def __repr__(self) -> str:
        return f"Syncthing({self.url!r})"

    # -- transport ---------------------------------------------------------
    def request(self, method: str, path: str, params: dict | None = None, body: object = None,
                *, timeout: float | None = None) -> object:
        """One API call; its JSON answer (None when the body is empty)."""
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={"X-API-Key": self.api_key})
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", "replace").strip()
            if exc.code in (401, 403):
                raise PeerUnavailable(
                    f"Syncthing at {self.url} refused the API key ({exc.code})",
                    hint="use the API key from Syncthing's config.xml (<gui><apikey>) or its GUI "
                         "(Actions > Settings > API Key)") from None
            if exc.code == 404:
                raise NotFound(f"Syncthing at {self.url}: {method} {path}: {text or 'not found'}",
                               hint="list what Syncthing has with 'statefs peer ls'") from None
            if exc.code == 400:
                raise InvalidArgument(f"Syncthing at {self.url} rejected {method} {path}: {text}",
                                      hint="check the device id or folder settings") from None
            raise PeerUnavailable(f"Syncthing at {self.url}: {method} {path} failed ({exc.code}): {text}",
                                  hint="see Syncthing's log; restart it if it keeps failing") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PeerUnavailable(
                f"Syncthing API at {self.url} is not answering: {reason}",
                hint="start Syncthing (e.g. 'systemctl --user start syncthing') and check the API "
                     "URL (its GUI address)") from None
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")

    def get(self, path: str, **params: object) -> object:
        return self.request("GET", path, params)

    # -- system ------------------------------------------------------------
    def ping(self) -> None:
        """Raises PeerUnavailable unless the API answers this key."""
        self.get("/rest/system/ping")

    def version(self) -> str:
        return str(self.get("/rest/system/version")["version"])

    def device_id(self) -> str:
        """This instance's own device id (the hash of its certificate)."""
        if self._my_id is None:
            self._my_id = str(self.get("/rest/system/status")["myID"])
        return self._my_id

    def normalize_device_id(self, device_id: str) -> str:
        """The canonical form of ``device_id`` as Syncthing checks it
        (groups, check characters); InvalidArgument if it is not one."""
        answer = self.get("/rest/svc/deviceid", id=device_id.strip())
        if not isinstance(answer, dict) or "id" not in answer:
            error = answer.get("error") if isinstance(answer, dict) else answer
            raise InvalidArgument(f"{device_id!r} is not a Syncthing device id: {error}",
                                  hint="copy the id from the peer's Syncthing (Actions > Show ID, "
                                       "or 'syncthing --device-id')")
        return str(answer["id"])

    def shutdown(self) -> None:
        self.request("POST", "/rest/system/shutdown")

    # -- configuration -----------------------------------------------------
    def config(self) -> dict:
        return self.get("/rest/config")

    def put_config(self, config: dict) -> None:
        self.request("PUT", "/rest/config", body=config)

    def patch_options(self, **options: object) -> None:
        self.request("PATCH", "/rest/config/options", body=options)

    def devices(self) -> list[dict]:
        return list(self.get("/rest/config/devices"))

    def device(self, device_id: str) -> dict | None:
        return next((d for d in self.devices() if d["deviceID"] == device_id), None)

    def add_device(self, device_id: str, address: str | None = None, name: str | None = None) -> None:
        """Adds a device, reached at ``address`` (like ``tcp://host:22000``)
        or, when None, found by discovery ("dynamic"). A device already
        configured (the user may share other folders with it) keeps its name,
        and its addresses unless ``address`` is given."""
        device = self.device(device_id)
        if device is None:
            device = dict(self.get("/rest/config/defaults/device"), deviceID=device_id,
                          addresses=[address or "dynamic"], name=name or "")
        elif address:
            device["addresses"] = [address]
        else:
            return
        self.request("PUT", f"/rest/config/devices/{device_id}", body=device)

    def patch_device(self, device_id: str, **fields: object) -> None:
        """Changes some settings of a device, e.g. ``maxRecvKbps`` or ``paused``."""
        self.request("PATCH", f"/rest/config/devices/{device_id}", body=fields)

    def remove_device(self, device_id: str) -> None:
        self.request("DELETE", f"/rest/config/devices/{device_id}")

    def folders(self) -> list[dict]:
        return list(self.get("/rest/config/folders"))

    def folder(self, folder_id: str) -> dict | None:
        return next((f for f in self.folders() if f["id"] == folder_id), None)

    def add_folder(self, folder_id: str, path: str, *, type: str = "sendonly", devices: tuple | list = (),
                   ignore_delete: bool = False, rescan_s: int = 60, fs_watcher: bool = True,
                   watcher_delay_s: int = 1, label: str | None = None) -> None:
        """Adds (or updates) a folder. StateFS folders hold immutable files
        written by rename, so permissions are ignored and a short watcher
        delay is safe."""
        if type not in FOLDER_TYPES:
            raise InvalidArgument(f"folder type {type!r} is not one of {', '.join(FOLDER_TYPES)}")
        folder = self.folder(folder_id) or dict(self.get("/rest/config/defaults/folder"), id=folder_id)
        members = {d["deviceID"] for d in folder.get("devices", [])} | {self.device_id(), *devices}
        folder.update(label=label or folder_id, path=os.path.abspath(path), type=type,
                      ignoreDelete=ignore_delete, rescanIntervalS=rescan_s, fsWatcherEnabled=fs_watcher,
                      fsWatcherDelayS=watcher_delay_s, ignorePerms=True,
                      devices=[{"deviceID": d, "introducedBy": "", "encryptionPassword": ""}
                               for d in sorted(members)])
        self.request("PUT", f"/rest/config/folders/{folder_id}", body=folder)

    def remove_folder(self, folder_id: str) -> None:
        self.request("DELETE", f"/rest/config/folders/{folder_id}")

    def share_folder(self, folder_id: str, device_id: str) -> None:
        self._set_members(folder_id, add=device_id)

    def unshare_folder(self, folder_id: str, device_id: str) -> None:
        self._set_members(folder_id, remove=device_id)

    def _set_members(self, folder_id: str, add: str | None = None, remove: str | None = None) -> None:
        folder = self.folder(folder_id)
        if folder is None:
            raise NotFound(f"Syncthing at {self.url} has no folder {folder_id}",
                           hint="add the folder first")
        members = [d for d in folder["devices"] if d["deviceID"] != remove]
        if add and all(d["deviceID"] != add for d in members):
            members.append({"deviceID": add, "introducedBy": "", "encryptionPassword": ""})
        self.request("PATCH", f"/rest/config/folders/{folder_id}", body={"devices": members})

    def pending_folders(self, device_id: str | None = None) -> dict[str, list[str]]:
        """Folders other devices offer that are not configured here:
        ``{folder id: [offering device ids]}``."""
        answer = self.get("/rest/cluster/pending/folders", device=device_id) or {}
        return {fid: sorted(entry.get("offeredBy", {})) for fid, entry in answer.items()}

    # -- database ----------------------------------------------------------
    def scan(self, folder_id: str, sub: str | None = None) -> None:
        """Rescan now (the watcher may lag); returns when the scan is done."""
        self.request("POST", "/rest/db/scan", {"folder": folder_id, "sub": sub}, timeout=max(self.timeout, 120))

    def folder_status(self, folder_id: str) -> dict:
        """/rest/db/status: state ("idle", "scanning", "syncing", "error"...),
        needBytes, receiveOnlyChangedFiles, error..."""
        return self.get("/rest/db/status", folder=folder_id)

    def completion(self, folder_id: str, device_id: str | None = None) -> Completion:
        """How far ``device_id`` (None: this instance) is with the folder."""
        c = self.get("/rest/db/completion", folder=folder_id, device=device_id)
        return Completion(completion=float(c.get("completion", 0.0)), need_bytes=int(c.get("needBytes", 0)),
                          need_items=int(c.get("needItems", 0)), need_deletes=int(c.get("needDeletes", 0)),
                          global_bytes=int(c.get("globalBytes", 0)))

    def revert(self, folder_id: str) -> None:
        """Undo local changes of a receive-only folder: changed or deleted
        files are fetched again from the devices that have them."""
        self.request("POST", "/rest/db/revert", {"folder": folder_id})

    # -- devices at run time ----------------------------------------------
    def connections(self) -> dict[str, dict]:
        """``{device id: {"connected": bool, "address": ..., "paused": ...}}``."""
        return dict(self.get("/rest/system/connections").get("connections", {}))

    def device_stats(self) -> dict[str, dict]:
        """``{device id: {"lastSeen": RFC 3339, ...}}``."""
        return dict(self.get("/rest/stats/device") or {})

    def pause_device(self, device_id: str) -> None:
        self.request("POST", "/rest/system/pause", {"device": device_id})

    def resume_device(self, device_id: str) -> None:
        self.request("POST", "/rest/system/resume", {"device": device_id})


# -- running an instance -----------------------------------------------------

def binary() -> str | None:
    """The syncthing program, or None when it is not installed."""
    return shutil.which("syncthing")


def read_home(home: str) -> tuple[str, str]:
    """(API url, API key) of the instance whose home is ``home``, from its config.xml."""
    path = os.path.join(home, "config.xml")
    try:
        gui = ET.parse(path).getroot().find("gui")
    except (OSError, ET.ParseError) as exc:
        raise InvalidArgument(f"cannot read Syncthing's configuration {path}: {exc}",
                              hint="pass the Syncthing home (the directory holding config.xml), "
                                   "or --api and --api-key") from None
    address, key = gui.findtext("address", ""), gui.findtext("apikey", "")
    if not address or not key:
        raise InvalidArgument(f"{path} has no GUI address or API key",
                              hint="set an API key in Syncthing's GUI (Settings > API Key)")
    scheme = "https" if gui.get("tls") == "true" else "http"
    return f"{scheme}://{address}", key


# Off in every instance StateFS starts: no announcement to or lookup through
# public servers, no relays, no port mapping on the router, no phoning home.
# Peers are reached at the addresses given with their device ids.
_QUIET_OPTIONS = {
    "globalAnnounceEnabled": "false", "localAnnounceEnabled": "false", "relaysEnabled": "false",
    "natEnabled": "false", "urAccepted": "-1", "autoUpgradeIntervalH": "0",
    "crashReportingEnabled": "false", "startBrowser": "false", "reconnectionIntervalS": "5",
    # With low priority on, Syncthing moves itself into a process group of
    # its own (to renice the group) and escapes the one it was started in.
    "setLowPriority": "false",
}


def _configure(home: str, gui_port: int, listen_port: int, name: str | None) -> str:
    """Writes the loopback-only settings into ``home/config.xml``; returns the API key."""
    path = os.path.join(home, "config.xml")
    tree = ET.parse(path)
    root = tree.getroot()
    gui = root.find("gui")
    gui.find("address").text = f"127.0.0.1:{gui_port}"
    apikey = gui.find("apikey")
    if apikey is None:
        apikey = ET.SubElement(gui, "apikey")
    if not apikey.text:
        apikey.text = secrets.token_urlsafe(24)
    options = root.find("options")
    for tag, value in {**_QUIET_OPTIONS, "listenAddress": f"tcp://127.0.0.1:{listen_port}"}.items():
        element = options.find(tag)
        if element is None:
            element = ET.SubElement(options, tag)
        element.text = value
    if name:
        me = root.find("device")
        me.set("name", name)
    tree.write(path)
    return apikey.text


def start_instance(home: str, gui_port: int, listen_port: int, *, name: str | None = None,
                   timeout: float = 30.0) -> tuple[subprocess.Popen, Syncthing]:
    """Starts Syncthing with its configuration and database in ``home``
    (generated on first use), its API on 127.0.0.1:``gui_port`` and its
    sync listener on tcp://127.0.0.1:``listen_port``; discovery, relays, NAT,
    usage and crash reporting and upgrades off, no default folder. Returns
    once the API answers. The process leads its own process group, so
    :func:`stop_instance` ends it and anything it spawned."""
    exe = binary()
    if exe is None:
        raise PeerUnavailable("syncthing is not installed",
                              hint="install it with scripts/setup (Debian package 'syncthing')")
    os.makedirs(home, exist_ok=True)
    if not os.path.exists(os.path.join(home, "config.xml")):
        gen = subprocess.run([exe, "generate", f"--home={home}", "--no-default-folder", "--skip-port-probing"],
                             capture_output=True, text=True, timeout=60)
        if gen.returncode != 0:
            raise PeerUnavailable(f"syncthing generate failed: {gen.stderr.strip()[-500:]}",
                                  hint=f"check that {home} is writable")
    api_key = _configure(home, gui_port, listen_port, name)
    st = Syncthing(f"http://127.0.0.1:{gui_port}", api_key, timeout=10.0)
    log_path = os.path.join(home, "syncthing.log")
    deadline = time.monotonic() + timeout
    said = ""
    while True:
        started_at = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        proc = _spawn(exe, home, log_path)
        while True:
            try:
                st.ping()
                return proc, st
            except PeerUnavailable as exc:
                failure = exc
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        stop_instance(proc)
        with open(log_path, "rb") as log:
            log.seek(started_at)
            said = log.read().decode("utf-8", "replace").strip() or said
        if "Error opening database" in said and time.monotonic() < deadline:
            # The previous instance on this home is still letting go of
            # its database lock: try again.
            time.sleep(0.2)
            continue
        raise PeerUnavailable(f"Syncthing in {home} did not start ({failure.message}):\n{said[-1500:]}",
                              hint=f"is port {gui_port} or {listen_port} already in use, or another "
                                   f"Syncthing running on {home}?")


def _spawn(exe: str, home: str, log_path: str) -> subprocess.Popen:
    env = dict(os.environ, STNOUPGRADE="1", STNORESTART="1", STNODEFAULTFOLDER="1")
    with open(log_path, "ab") as log:
        return subprocess.Popen([exe, "serve", f"--home={home}", "--no-browser", "--no-restart", "--no-upgrade",
                                 "--no-default-folder"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)


def stop_instance(proc: subprocess.Popen, timeout: float = 10.0, *, kill: bool = False) -> None:
    """Ends an instance started by :func:`start_instance`: its whole process
    group (Syncthing runs as a monitor and a child), SIGTERM first unless
    ``kill`` (SIGKILL at once, as a crash would). Returns once every process
    of the group is gone: until then the child still holds the database
    lock and a new instance on the same home would fail to open it."""
    signals = (signal.SIGKILL,) if kill else (signal.SIGTERM, signal.SIGKILL)
    for sig in signals:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        if _group_gone(proc, timeout):
            return
    proc.wait()


def _group_gone(proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()     # reap the monitor, our child
        if not live_members(proc.pid):
            return True
        time.sleep(0.02)
    return False


def live_members(pgid: int) -> list[int]:
    """Processes of the group that still run. A zombie counts as gone (its
    reaping, by init for the monitor's child, can lag by a second or more)
    once all its threads have exited: a killed Go program's main thread
    turns zombie first while the others still hold its files, and with them
    the database lock."""
    live = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _state(f"/proc/{entry}/stat", pgid) is not None:
            tasks = _tasks(entry)
            if any(_state(f"/proc/{entry}/task/{t}/stat", pgid) not in (None, b"Z", b"X") for t in tasks):
                live.append(int(entry))
    return live


def _tasks(pid: str) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def _state(stat_path: str, pgid: int) -> bytes | None:
    """The state letter of a process or thread in group ``pgid``; None if it
    is gone or in another group."""
    try:
        with open(stat_path, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0] if int(fields[2]) == pgid else None


def main(argv: list[str] | None = None) -> int:
    """``python -m statefsd.replica.syncthing --home DIR --gui-port N
    --listen-port N``: starts a loopback-only instance that keeps running
    after this command returns, and prints ``device ID``, ``pid PGID`` (its
    process group: ``kill -TERM -PGID`` stops it), ``url URL``."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m statefsd.replica.syncthing",
                                description="Start a Syncthing instance on loopback for StateFS (tests, demos).")
    p.add_argument("--home", required=True, help="its configuration and database directory (created)")
    p.add_argument("--gui-port", type=int, required=True, help="API port on 127.0.0.1")
    p.add_argument("--listen-port", type=int, required=True, help="sync port on 127.0.0.1")
    p.add_argument("--name", help="its device name")
    args = p.parse_args(argv)
    try:
        proc, st = start_instance(args.home, args.gui_port, args.listen_port, name=args.name)
        print(f"device {st.device_id()}\npid {proc.pid}\nurl {st.url}", flush=True)
    except PeerUnavailable as exc:
        print(f"syncthing: {exc.code.name}: {exc.message} ({exc.hint})", file=sys.stderr)
        return int(exc.code)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
