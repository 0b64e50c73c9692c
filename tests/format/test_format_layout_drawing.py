"""The byte drawings in format.py's docstring match the structures it packs.

A reader opens format.py to learn where a field lives; a drawing that
drifted from the code would send them to the wrong byte. Each drawing is
parsed ("offset width name" triples, column by column) and compared with
the real layout, so every field appears once, at its offset, in order.
"""

from __future__ import annotations

import re
import struct

from statefsd.storage import format as fmt

FIELD = re.compile(r"(?<![\w.(-])(\d+)\s+(\d+)\s+([a-z][a-z0-9_]*)")


def drawn(start: str, end: str | None = None) -> list[tuple[int, int, str]]:
    """The fields drawn between the lines ``start`` and ``end`` (or the
    docstring's end) in reading order: down the first column, then down the
    second, and so on. A field drawn in the wrong column reads out of order."""
    doc = fmt.__doc__
    block = doc[doc.index(start):doc.index(end) if end else None]
    columns: list[list[tuple[int, int, str]]] = []
    for line in block.splitlines():
        for i, (offset, width, name) in enumerate(FIELD.findall(line)):
            if i == len(columns):
                columns.append([])
            columns[i].append((int(offset), int(width), name))
    return [field for column in columns for field in column]


def test_the_superblock_drawing_lists_every_field_once_at_its_real_offset():
    real, offset = [], 0
    for sub in fmt._SUPERBLOCK_BODY.subcons:
        real.append((offset, sub.sizeof(), sub.name))
        offset += sub.sizeof()
    real.append((fmt.SUPERBLOCK_CRC_OFFSET, 4, "crc32c"))
    assert drawn("Superblock slot", "Record =") == real


def test_the_record_header_drawing_lists_every_field_once_at_its_real_offset():
    codes = re.findall(r"\d*[a-zA-Z]", fmt._HEADER.format[1:])
    names = [*fmt.RecordHeader._fields, "reserved"]
    real = [(struct.calcsize("<" + "".join(codes[:i])), struct.calcsize("<" + code), name)
            for i, (code, name) in enumerate(zip(codes, names))]
    real[0] = (0, 4, "crc32c")   # drawn under the checksum's name
    assert drawn("Record =") == real
