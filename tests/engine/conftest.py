import pytest

from statefsd.blockdev import FileDevice, create_image
from statefsd.engine import Engine


class Image:
    """A real image file on disk, mounted and remounted like statefsd does."""

    def __init__(self, path, size):
        self.path = str(path)
        create_image(self.path, size)
        with FileDevice(self.path) as dev:
            Engine.mkfs(dev)
        self.events = []

    def mount(self, **kw):
        return Engine.mount(FileDevice(self.path, read_only=kw.get("read_only", False)),
                            audit=lambda event, **f: self.events.append((event, f)), **kw)

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
