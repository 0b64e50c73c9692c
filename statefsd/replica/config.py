"""A device's replication settings: the state directory and replica.json.

    STATE/replica.json      peers, remotes and the policy of this image's replica
    STATE/outbox/           what peers and remotes receive (format.py)
    STATE/peers/<ID>/       the report folder each peer's node sends back
    STATE/rclone.conf       the remotes' rclone settings (never the user's own)
    STATE/audit.jsonl       replication's audit journal
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from statefsd.errors import InvalidArgument, NotFound
from statefsd.replica.outbox import Policy

CONFIG_NAME = "replica.json"
DEFAULT_STATE = "var/replica"


def state_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("STATEFS_REPLICA_DIR") or DEFAULT_STATE)


@dataclass
class ReplicaConfig:
    replica_id: str = ""                   # hex; names the Syncthing folders
    socket: str | None = None
    syncthing: dict | None = None          # {"url": ..., "api_key": ...}
    peers: dict = field(default_factory=dict)
    remotes: dict = field(default_factory=dict)
    policy: dict = field(default_factory=lambda: {"copies": 2, **asdict(Policy())})
    format: int = 1

    def push_policy(self) -> Policy:
        return Policy(self.policy.get("segment_bytes", Policy.segment_bytes),
                      self.policy.get("keep_generations", Policy.keep_generations))

    @property
    def copies(self) -> int:
        return int(self.policy.get("copies", 2))


def outbox(state: Path) -> Path:
    return state / "outbox"


def load(state: Path) -> ReplicaConfig:
    path = state / CONFIG_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"no replication is set up in {state}",
                       hint="run `statefs replicate init --state DIR` first (or set $STATEFS_REPLICA_DIR)") from None
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{path} is unreadable: {exc}", hint="fix or remove it and run init again") from None
    if not isinstance(raw, dict) or raw.get("format") != 1:
        raise InvalidArgument(f"{path} is not a replica config of format 1", hint="run init again in a new DIR")
    known = {k: raw[k] for k in ReplicaConfig.__dataclass_fields__ if k in raw}
    return ReplicaConfig(**known)


def save(state: Path, config: ReplicaConfig) -> None:
    state.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=state, prefix=".replica.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(config), f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, state / CONFIG_NAME)
