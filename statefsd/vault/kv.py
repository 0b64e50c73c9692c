"""The vault's view of StateFS: the handful of operations it builds on.

A vault runs against a statefsd (``ClientKV``) in normal use; the power-loss
campaign runs the same vault code against an engine mounted on a simulated
device through an adapter with these same methods.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol

from statefsd.client import Client

Versioned = tuple[bytes, int]          # (value, txn id of the key's last write)
LIST_PAGE = 4096


class KV(Protocol):
    def mget(self, keys: list[str]) -> list[Versioned | None]: ...
    def apply(self, ops: Iterable[tuple], expect: Iterable[tuple[str, int]] = ()) -> int | None: ...
    def list_page(self, prefix: str, after: str | None, limit: int) -> tuple[list[str], bool]: ...
    def compact(self) -> dict: ...
    def verify(self) -> dict: ...
    def clone(self) -> "KV": ...
    def close(self) -> None: ...


class ClientKV:
    """A statefsd connection as the vault's KV."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def mget(self, keys: list[str]) -> list[Versioned | None]:
        return self.client.mget(keys)

    def apply(self, ops: Iterable[tuple], expect: Iterable[tuple[str, int]] = ()) -> int | None:
        return self.client.apply(ops, expect=expect)

    def list_page(self, prefix: str, after: str | None, limit: int) -> tuple[list[str], bool]:
        args: dict = {"prefix": prefix, "limit": limit}
        if after is not None:
            args["after"] = after
        page = self.client.call("list", **args)
        return list(page["keys"]), bool(page.get("more"))

    def compact(self) -> dict:
        return self.client.compact()

    def verify(self) -> dict:
        return self.client.verify()

    def clone(self) -> "ClientKV":
        """A second connection to the same statefsd."""
        return ClientKV(Client(self.client.socket_path, timeout=self.client.timeout))

    def close(self) -> None:
        self.client.close()


def get(kv: KV, key: str) -> Versioned | None:
    return kv.mget([key])[0]


def iter_keys(kv: KV, prefix: str, after: str | None = None) -> Iterator[str]:
    """Every key under ``prefix`` in order, one page in memory at a time."""
    while True:
        keys, more = kv.list_page(prefix, after, LIST_PAGE)
        yield from keys
        if not more or not keys:
            return
        after = keys[-1]
