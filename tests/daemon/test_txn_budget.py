"""The daemon-wide budget for bytes buffered by open transactions, and the
memory those transactions leave behind once they end."""

import os

import pytest

from statefsd.errors import Code
from statefsd.server import DEFAULT_TXN_BUDGET, MIN_TXN_BUDGET
from statefsd.storage.format import MAX_TXN_BYTES, MAX_VALUE_BYTES
from tests.daemon.harness import RawConnection, Workspace, wait_for

FULL = os.urandom(MAX_VALUE_BYTES)


@pytest.fixture
def big_ws(tmp_path):
    """A workspace whose log has room to commit maximum-size transactions."""
    workspace = Workspace(tmp_path, image_size=96 << 20)
    yield workspace
    workspace.cleanup()


def _open_full_transaction(socket_path: str, tag: str) -> RawConnection:
    """A connection holding an open transaction of the maximum size."""
    raw = RawConnection(socket_path)
    assert raw.request("begin")["ok"]
    for i in range(MAX_TXN_BYTES // MAX_VALUE_BYTES):
        reply = raw.request("txn_put", request_id=2 + i, key=f"{tag}/{i}", value=FULL)
        assert reply["ok"], reply
    return raw


def _error(reply: dict) -> dict:
    assert reply["ok"] is False, reply
    return reply["error"]


def test_open_transactions_of_all_clients_share_one_budget_and_the_one_over_it_gets_ebusy(big_ws):
    daemon = big_ws.start(extra=["--txn-budget", "17M"])     # one maximum-size transaction
    holder = _open_full_transaction(daemon.socket, "a")
    other = RawConnection(daemon.socket)
    assert other.request("begin")["ok"]
    error = _error(other.request("txn_put", request_id=2, key="b/0", value=b"x" * (2 << 20)))
    assert error["code"] == Code.EBUSY
    assert "--txn-budget" in error["message"] and "the transaction was aborted" in error["message"]
    assert "--txn-budget" in error["hint"]
    assert _error(other.request("commit", request_id=3))["code"] == Code.ETXN  # all or nothing
    with daemon.client() as c:    # single puts are not buffered: they still work
        c.put("single", b"v")

    assert holder.request("commit", request_id=9)["ok"]   # its bytes go back to the budget
    assert other.request("begin", request_id=4)["ok"]
    assert other.request("txn_put", request_id=5, key="b/0", value=b"x" * (2 << 20))["ok"]
    assert other.request("commit", request_id=6)["ok"]
    with daemon.client() as c:
        assert c.get("a/1") == FULL and c.get("b/0") == b"x" * (2 << 20)
    assert any(e["event"] == "refused" and e["fields"]["code"] == "EBUSY" for e in daemon.audit_events())


def test_a_transaction_aborted_or_abandoned_gives_its_bytes_back(big_ws):
    daemon = big_ws.start(extra=["--txn-budget", "17M"])
    _open_full_transaction(daemon.socket, "a").request("abort", request_id=99)
    gone = _open_full_transaction(daemon.socket, "b")
    gone.close()                                       # the client leaves mid-transaction
    probe = RawConnection(daemon.socket)

    def full_transaction_fits() -> bool:
        probe.request("abort", request_id=1)
        probe.request("begin", request_id=2)
        return all(probe.request("txn_put", request_id=3 + i, key=f"c/{i}", value=FULL)["ok"]
                   for i in range(MAX_TXN_BYTES // MAX_VALUE_BYTES))

    assert wait_for(full_transaction_fits, timeout=10)
    assert probe.request("commit", request_id=10)["ok"]


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_memory_buffered_by_transactions_is_returned_once_their_clients_leave(big_ws):
    """Full-size values first (after glibc frees blocks that large it stops
    giving large allocations their own mappings), then many values of 40 KB:
    the shape that stayed resident in per-thread arenas (40-130 MiB)."""
    daemon = big_ws.start()
    idle = _rss_mib(daemon.proc.pid)
    for n in range(3):
        _open_full_transaction(daemon.socket, f"big{n}").close()
    value = os.urandom(40_000)
    clients = []
    for n in range(12):
        raw = RawConnection(daemon.socket)
        raw.request("begin")
        for i in range(120):
            assert raw.request("txn_put", request_id=2 + i, key=f"t{n}/{i}", value=value)["ok"]
        clients.append(raw)
    held = _rss_mib(daemon.proc.pid)
    assert held > idle + 40, (idle, held)               # 55 MiB of values are buffered
    for raw in clients:
        raw.close()
    assert wait_for(lambda: _rss_mib(daemon.proc.pid) < idle + 12, timeout=10), (
        idle, held, _rss_mib(daemon.proc.pid))


def test_a_txn_budget_smaller_than_one_transaction_is_a_usage_error_naming_the_minimum(ws):
    daemon = ws.start(extra=["--txn-budget", "16M"], wait=False)
    assert daemon.wait_exit() == 2
    assert any(f"give at least {-(-MIN_TXN_BUDGET >> 20)}M" in line for line in daemon.stderr), daemon.stderr


def test_the_default_budget_holds_four_transactions_of_the_maximum_size():
    assert DEFAULT_TXN_BUDGET == 4 * MIN_TXN_BUDGET
    assert MIN_TXN_BUDGET >= MAX_TXN_BYTES


def test_a_value_held_as_a_view_of_its_frame_is_charged_the_whole_frame_it_keeps_alive():
    from statefsd.server import OP_OVERHEAD, TxnBudget, TxnBuffer

    frame = bytes(200_000)
    buffer = TxnBuffer(TxnBudget(DEFAULT_TXN_BUDGET))
    buffer.add("put", "viewed", memoryview(frame).toreadonly()[100:70_100])
    buffer.add("put", "copied", bytes(70_000))
    assert buffer.held == (len("viewed") + len(frame) + OP_OVERHEAD) + (len("copied") + 70_000 + OP_OVERHEAD)
    buffer.release()
    assert buffer.budget.used == 0
