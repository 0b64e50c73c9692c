"""Block devices: the only way StateFS touches storage.

Contract every device keeps (the engine relies on nothing else):

* ``size`` is the usable size in bytes, a multiple of ``SECTOR``.
* ``write(offset, data)``: offset and length are multiples of ``SECTOR``
  (512 bytes, the unit a power cut may tear at). A write is *volatile* until
  the next ``flush()``: a power cut may drop, tear or garble it.
* ``flush()`` returns only when every earlier write is durable.
* ``read(offset, length)`` sees every earlier write, flushed or not.
* ``write_durable(offset, data)`` is ``write`` then ``flush`` in one call:
  a power cut during it may drop, tear or garble ``data`` (as between a
  write and its flush), and on return ``data`` and every earlier write are
  durable. Wrappers that override ``write`` or ``flush`` inherit the
  default, which calls exactly those two.

``FileDevice`` serves image files and raw block devices (/dev/vda). The
simulated device with a volatile write cache lives in ``simdev``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import threading

from statefsd.errors import Busy, DeviceIOError, InvalidArgument

SECTOR = 512
# Per-write O_DSYNC (Linux 4.7+); None where os lacks it.
_RWF_DSYNC = getattr(os, "RWF_DSYNC", None)


class AlignedBuffers:
    """Page-aligned scratch memory (as O_DIRECT wants), one buffer per
    thread, grown in whole MiB to the largest size asked for so far."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, size: int) -> mmap.mmap:
        buf = getattr(self._local, "buf", None)
        if buf is None or size > len(buf):
            # mmap memory is page aligned
            buf = self._local.buf = mmap.mmap(-1, max(1 << 20, (size + 0xFFFFF) & ~0xFFFFF))
        return buf


def page_aligned(data) -> bool:
    """Whether ``data`` is writable memory starting on a page boundary (a
    group the log writer built in AlignedBuffers memory): then O_DIRECT can
    write it as it is, without a copy into an aligned buffer."""
    if not isinstance(data, (memoryview, mmap.mmap)):
        return False
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(data))
    except (TypeError, ValueError):  # read-only or empty
        return False
    return address % mmap.PAGESIZE == 0


class BlockDevice:
    """Interface; see the module docstring for the durability contract."""

    size: int = 0
    path: str = "<device>"

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def write(self, offset: int, data: bytes) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def write_durable(self, offset: int, data: bytes) -> None:
        self.write(offset, data)
        self.flush()

    def close(self) -> None:
        pass

    def _check_write(self, offset: int, length: int) -> None:
        if offset % SECTOR or length % SECTOR:
            raise InvalidArgument(f"unaligned write at {offset} length {length}")
        if offset < 0 or offset + length > self.size:
            raise InvalidArgument(f"write at {offset} length {length} outside device of {self.size} bytes")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FileDevice(BlockDevice):
    """An image file or a raw block device, flushed with fdatasync.

    Writes go through a second descriptor opened with O_DIRECT, from an
    aligned buffer, so a 512-byte write reaches the device as a 512-byte
    write. Through the page cache it would go out as a whole 4 KiB page,
    rewriting sectors of earlier, acknowledged groups, which a power cut may
    then tear (DESIGN.md invariant 7; found by qemu/powercut.py). Reads are
    direct too: a buffered read racing a direct write to the same page can
    leave a stale page in the cache (seen as a checksum failure during
    online compaction). Where O_DIRECT is not supported (tmpfs), all I/O is
    buffered and ``direct`` is False.

    ``write_durable`` is one ``pwritev(..., RWF_DSYNC)`` (one device round
    trip: FUA where the disk has it, else the kernel's flush right after)
    when no earlier write is still unflushed; RWF_DSYNC makes only its own
    write durable, so after an unflushed write it is write then fdatasync.

    ``lock=True`` takes an exclusive, non-blocking flock so that one process
    owns the image; a second gets :class:`Busy` with a clear message.
    """

    def __init__(self, path: str, *, read_only: bool = False, lock: bool = True,
                 direct: bool = True) -> None:
        self.path = path
        self.read_only = read_only
        flags = os.O_RDONLY if read_only else os.O_RDWR
        try:
            self.fd = os.open(path, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidArgument(f"{path}: no such image or device",
                                  hint="check the path, or create an image with "
                                       "'statefs mkfs IMAGE --size 64M'") from None
        except IsADirectoryError:
            raise InvalidArgument(f"{path} is a directory, not an image or device",
                                  hint="give the image file inside it, e.g. "
                                       f"{os.path.join(path, 'statefs.img')}") from None
        except PermissionError as exc:
            raise InvalidArgument(f"{path}: cannot open: {exc.strerror}",
                                  hint="check the file's permissions, or run as its owner") from None
        except OSError as exc:
            raise DeviceIOError(f"{path}: cannot open: {exc.strerror}") from None
        self.wfd = self.fd
        self.direct = False
        # Set after every plain write, cleared just before each flush: a
        # write that lands while a flush runs keeps it set.
        self._unflushed = False
        self._dsync = _RWF_DSYNC is not None
        try:
            if lock:
                self._lock()
            self.size = self._device_size() // SECTOR * SECTOR
            if direct:
                self._open_direct()
        except BaseException:
            os.close(self.fd)
            raise

    def _open_direct(self) -> None:
        mode = os.O_RDONLY if self.read_only else os.O_RDWR
        try:
            self.wfd = os.open(self.path, mode | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            return  # e.g. tmpfs: buffered I/O it is
        self.direct = True
        self._buffers = AlignedBuffers()

    def _aligned_buffer(self, size: int) -> mmap.mmap:
        return self._buffers.get(size)

    def _lock(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Busy(f"{self.path} is in use by another statefsd or fsck-statefs") from None
            raise DeviceIOError(f"{self.path}: cannot lock: {exc.strerror}") from None

    def _device_size(self) -> int:
        st = os.fstat(self.fd)
        if stat.S_ISREG(st.st_mode):
            return st.st_size
        # A block device reports its size through lseek(SEEK_END).
        return os.lseek(self.fd, 0, os.SEEK_END)

    def read(self, offset: int, length: int) -> bytes:
        if self.direct:
            return self._read_direct(offset, length)
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as exc:
            raise DeviceIOError(f"{self.path}: read at {offset}: {exc.strerror}") from None
        if len(data) < length:  # past the end reads as zeros, like a short device
            data += bytes(length - len(data))
        return data

    def write(self, offset: int, data: bytes) -> None:
        self._check_write(offset, len(data))
        if self.direct:
            self._write_direct(offset, data)
        else:
            self._write_buffered(offset, data)
        self._unflushed = True

    def write_durable(self, offset: int, data: bytes) -> None:
        if not self.direct or self._unflushed or not self._dsync:
            return super().write_durable(offset, data)
        self._check_write(offset, len(data))
        self._write_direct(offset, data, _RWF_DSYNC)
        if not self._dsync:  # the flag was refused: the write went out plain
            self.flush()

    def _write_buffered(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                done = os.pwrite(self.fd, view, offset)
                view = view[done:]
                offset += done
        except OSError as exc:
            raise DeviceIOError(f"{self.path}: write at {offset}: {exc.strerror}") from None

    def _read_direct(self, offset: int, length: int) -> bytes:
        start = offset // SECTOR * SECTOR
        end = min(-(-(offset + length) // SECTOR) * SECTOR, self.size)
        data = b""
        if end > start:
            buf = self._aligned_buffer(end - start)
            view = memoryview(buf)[:end - start]
            try:
                got = os.preadv(self.wfd, [view], start)
            except OSError as exc:
                raise DeviceIOError(f"{self.path}: read at {offset}: {exc.strerror}") from None
            finally:
                view.release()
            data = buf[offset - start:min(offset - start + length, got)] if got > offset - start else b""
        if len(data) < length:  # past the end reads as zeros, like a short device
            data += bytes(length - len(data))
        return data

    def _write_direct(self, offset: int, data: bytes, flags: int = 0) -> None:
        if page_aligned(data):
            view = memoryview(data).cast("B")
        else:
            buf = self._aligned_buffer(len(data))
            buf[:len(data)] = data
            view = memoryview(buf)[:len(data)]
        try:
            while view:
                try:
                    done = os.pwritev(self.wfd, [view], offset, flags)
                except OSError as exc:
                    if not flags or exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    # A kernel or file system without per-write flags:
                    # plain writes and a flush, now and from now on.
                    self._dsync = False
                    flags = 0
                    continue
                if done % SECTOR:
                    raise OSError(errno.EIO, "short direct write")
                view = view[done:]
                offset += done
        except OSError as exc:
            raise DeviceIOError(f"{self.path}: write at {offset}: {exc.strerror}") from None
        finally:
            view.release()

    def flush(self) -> None:
        self._unflushed = False
        try:
            os.fdatasync(self.wfd)
        except OSError as exc:
            self._unflushed = True  # nothing is known durable after a failed flush
            raise DeviceIOError(f"{self.path}: flush: {exc.strerror}") from None

    def close(self) -> None:
        if self.wfd >= 0 and self.wfd != self.fd:
            os.close(self.wfd)
        self.wfd = -1
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def create_image(path: str, size: int, *, sparse: bool = False) -> None:
    """Create an image file of ``size`` bytes, fully written with zeros.

    Pre-writing matters: a later fdatasync into already-allocated blocks
    carries no file-system metadata, so a commit costs one plain flush.
    ``sparse`` skips it (quick, no space used up front); then the first
    write into each hole also allocates blocks, and that commit's flush
    carries file-system metadata too.
    """
    if size % SECTOR:
        raise InvalidArgument(f"image size {size} is not a multiple of {SECTOR}",
                              hint="give a size in whole KiB or with an M or G suffix, e.g. 64M")
    chunk = bytes(1 << 20)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, 0)
        if sparse:
            os.ftruncate(fd, size)
            os.fsync(fd)
            return
        written = 0
        while written < size:
            n = min(len(chunk), size - written)
            written += os.pwrite(fd, chunk[:n], written)
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_size(text: str) -> int:
    """'64M' -> 67108864. Accepts K, M, G, T suffixes (binary)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise InvalidArgument(f"cannot parse size {text!r}",
                              hint="give a number with an optional K, M, G or T suffix, e.g. 64M") from None
