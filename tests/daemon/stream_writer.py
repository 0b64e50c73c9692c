"""A client process that commits multi-key transactions and records each
acknowledgement, for the concurrency and crash tests.

    python stream_writer.py SOCKET WRITER COUNT ACKFILE

Transaction i of writer w puts ``w{w}/t{i}/k{j}`` for j in 0..KEYS-1 with
``value_for(w, i, j)`` and sets ``w{w}/last`` to i. After commit returns,
"i" is appended to ACKFILE. COUNT=0 means "until the daemon goes away".
Exits 0 when done or when the daemon vanished (ConnectionFailed).
"""

from __future__ import annotations

import hashlib
import itertools
import sys

KEYS = 3


def value_for(writer: int, txn: int, key: int) -> bytes:
    seed = hashlib.sha256(f"{writer}:{txn}:{key}".encode()).digest()
    return seed * (1 + (seed[0] % 64))  # 32..2048 bytes, exact content checkable


def txn_keys(writer: int, txn: int) -> list[str]:
    return [f"w{writer}/t{txn}/k{j}" for j in range(KEYS)]


def main() -> int:
    from statefsd.client import Client
    from statefsd.errors import ConnectionFailed

    socket_path, writer, count, ackfile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    client = Client(socket_path)
    with open(ackfile, "a", buffering=1) as acks:
        for i in (itertools.count() if count == 0 else range(count)):
            try:
                with client.transaction() as t:
                    for j, key in enumerate(txn_keys(writer, i)):
                        t.put(key, value_for(writer, i, j))
                    t.put(f"w{writer}/last", str(i).encode())
            except ConnectionFailed:
                return 0
            acks.write(f"{i}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
