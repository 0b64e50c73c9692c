import contextlib
import dataclasses

import pytest

from statefsd.storage import format as fmt

from statefsd.storage.blockdev import FileDevice, create_image
from statefsd.storage.engine import Engine
from statefsd.storage.image import read_superblock_slot
from statefsd.storage.logscan import ScanEnd, scan_groups


def committed_records(path):
    """Every record of the complete groups of the image's active log, read
    from the file without a lock (a running statefsd may hold it)."""
    with FileDevice(str(path), read_only=True, lock=False) as dev:
        sb = read_superblock_slot(dev)[0]
        return [rec for group in scan_groups(dev, sb) if not isinstance(group, ScanEnd) for rec in group]


class Consumer:
    """What a replica does with feed pages (Engine.feed or Client.feed, same
    arguments): drop everything on reset, apply each transaction's changes
    in order."""

    def __init__(self) -> None:
        self.state: dict[str, bytes] = {}
        self.cursor: bytes | None = None
        self.last = 0
        self.txns: list[tuple] = []
        self.pages: list[dict] = []

    def apply(self, page: dict) -> None:
        self.pages.append(page)
        if page["reset"]:
            self.state.clear()
        for txn_id, chain, changes in page["txns"]:
            self.txns.append((txn_id, chain, changes))
            for key, value in changes:
                if value is None:
                    self.state.pop(key, None)
                else:
                    self.state[key] = value
            self.last = txn_id
        self.cursor = page["cursor"]

    def page(self, source, max_bytes: int = 8 << 20) -> dict:
        """One page after the last one, applied."""
        page = source.feed(self.last if self.cursor else 0, self.cursor, max_bytes)
        self.apply(page)
        return page

    def catch_up(self, source, max_bytes: int = 8 << 20) -> int:
        """Feed until ``more`` is False; the number of pages it took."""
        pages = 1
        while self.page(source, max_bytes)["more"]:
            pages += 1
        return pages


def forged_cursor(cursor: bytes, **change) -> bytes:
    """``cursor`` with fields changed: ``version`` (its first byte), the
    feed.Cursor fields, or ``offset``/``next_seq``/``next_group`` of its point."""
    from statefsd.storage.feed import Cursor
    if "version" in change:
        return bytes([change["version"]]) + cursor[1:]
    parsed = Cursor.unpack(cursor)
    point = parsed.point._replace(**{k: change.pop(k) for k in list(change) if k in parsed.point._fields})
    return dataclasses.replace(parsed, point=point, **change).pack()


class Image:
    """A real image file on disk, mounted and remounted like statefsd does."""

    def __init__(self, path, size, redundancy="parity"):
        self.path = str(path)
        create_image(self.path, size)
        with FileDevice(self.path) as dev:
            self.sb = Engine.mkfs(dev, redundancy=redundancy)
        self.events = []

    def mount(self, **kw):
        return Engine.mount(FileDevice(self.path, read_only=kw.get("read_only", False)),
                            audit=lambda event, **f: self.events.append((event, f)), **kw)

    @contextlib.contextmanager
    def mount_then_crash(self, **kw):
        """A mount that ends like a process crash after its last commit: every
        commit was flushed, but no clean unmount recorded the durable floor."""
        engine = self.mount(**kw)
        try:
            yield engine
        finally:
            engine.device.close()

    def tear_tail(self, end):
        """Lose the last data sector of the group ending at ``end`` and its
        parity trailer: what a write cut by power loss leaves."""
        trailer = fmt.PARITY_TRAILER_SIZE if self.sb.redundancy else 0
        self.patch(end - trailer - 512, bytes(trailer + 512))

    def read(self, offset, length):
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def patch(self, offset, data):
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def bytes(self):
        with open(self.path, "rb") as f:
            return f.read()


@pytest.fixture
def image(tmp_path):
    return Image(tmp_path / "state.img", 4 << 20)


@pytest.fixture
def plain_image(tmp_path):
    """An image without redundancy: damage is detected, never repaired."""
    return Image(tmp_path / "plain.img", 4 << 20, redundancy="off")
