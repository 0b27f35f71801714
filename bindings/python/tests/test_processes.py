"""Real processes: broadcast, work queue, stage, lossless blocking, every
dtype across processes, kill -9 of a consumer holding arrays, Ctrl-C."""

import json
import signal
import time

import numpy as np
import pytest

import tensorbus as tb
from conftest import free_slots, peer, total_slots

DTYPES = list(tb.DTYPES)


def lines(p, n, timeout=30):
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, "peer too slow"
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"peer exited: rc={p.wait()} stderr={p.stderr.read()}")
        out.append(line.strip())
    return out


def wait_ok(p, timeout=30):
    rc = p.wait(timeout=timeout)
    assert rc == 0, p.stderr.read()


def value_of(dtype, seq):
    if dtype == "bfloat16":
        return 0x3F80 + seq
    if dtype == "bool":
        return float(seq % 2 == 1)
    return float(seq % 100)


def test_broadcast_two_consumer_processes(broker, client):
    n = 20
    consumers = [peer("consume", broker.socket, "bcast", n, "block") for _ in range(2)]
    for c in consumers:
        assert lines(c, 1) == ["ready"]
    prod = client.producer("bcast")
    for i in range(n):
        with prod.loan((3, 5), "float32", timeout=10.0) as t:
            np.asarray(t)[:] = i
            t.publish(user_header=str(i).encode())
    for c in consumers:
        got = [json.loads(x) for x in lines(c, n)]
        assert [g["seq"] for g in got] == list(range(n))  # lossless, in order
        assert [g["sum"] for g in got] == [15.0 * i for i in range(n)]
        assert [g["user_header"] for g in got] == [str(i) for i in range(n)]
        assert all(g["producer"] == client.id for g in got)
        wait_ok(c)
    assert free_slots(client) == total_slots(client)


def test_workqueue_two_worker_processes(broker, client):
    n = 24
    # each worker takes what it gets; the two together see every tensor once
    workers = [peer("consume", broker.socket, "work", n, "block") for _ in range(2)]
    for w in workers:
        assert lines(w, 1) == ["ready"]
    prod = client.producer("work")
    for i in range(n):
        with prod.loan((3, 5), "int32", timeout=10.0) as t:
            np.asarray(t)[:] = i
            t.publish()
    import queue
    import threading

    q = queue.Queue()

    def pump(w):
        for line in w.stdout:
            q.put(line)

    for w in workers:
        threading.Thread(target=pump, args=(w,), daemon=True).start()
    seqs = []
    while len(seqs) < n:
        try:
            g = json.loads(q.get(timeout=20))
        except queue.Empty:
            raise AssertionError(f"got only {sorted(seqs)}")
        assert g["sum"] == 15.0 * g["seq"]
        seqs.append(g["seq"])
    assert sorted(seqs) == list(range(n))
    for w in workers:
        w.kill()
        w.wait()


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_across_processes(broker, client, dtype):
    cons = client.consumer("bcast", depth=8)
    p = peer("produce", broker.socket, "bcast", 3, dtype)
    wait_ok(p)
    for i in range(3):
        with cons.recv(timeout=5.0) as t:
            assert t.dtype == dtype and t.shape == (3, 5) and t.seq == i
            assert t.user_header == f"peer:{i}".encode()
            assert t.producer != client.id
            a = np.asarray(t)
            assert float(a.reshape(-1)[0]) == value_of(dtype, i)
            assert a.strides == t.strides


def test_consumer_process_sees_producer_bytes(broker, client):
    c = peer("consume", broker.socket, "bcast", 1)
    assert lines(c, 1) == ["ready"]
    prod = client.producer("bcast")
    with prod.loan((3, 5), "float64") as t:
        np.asarray(t)[:] = np.arange(15).reshape(3, 5)
        t.publish(user_header=b"abc")
    g = json.loads(lines(c, 1)[0])
    assert g["sum"] == float(sum(range(15))) and g["dtype"] == "float64"
    assert g["shape"] == [3, 5] and g["user_header"] == "abc" and g["ts"] > 0
    wait_ok(c)


def test_stage_process(broker, client):
    n = 5
    s = peer("stage", broker.socket, "stage/in", "stage/out", n)
    assert lines(s, 1) == ["ready"]
    out = client.consumer("stage/out", depth=8)
    prod = client.producer("stage/in")
    for i in range(n):
        with prod.loan(4, "float32", timeout=10.0) as t:
            np.asarray(t)[:] = i
            t.publish()
    for i in range(n):
        with out.recv(timeout=10.0) as r:
            assert np.asarray(r).tolist() == [2.0 * i] * 4
    assert lines(s, 1) == ["done"]
    wait_ok(s)


def test_kill_9_consumer_holding_arrays_frees_every_slot(broker, client):
    h = peer("hold", broker.socket, "bcast", 5)
    assert lines(h, 1) == ["ready"]
    prod = client.producer("bcast")
    for i in range(5):
        with prod.loan((3, 5), "uint8") as t:
            t.publish()
    assert lines(h, 1) == ["holding"]
    assert free_slots(client) == total_slots(client) - 5
    h.send_signal(signal.SIGKILL)
    h.wait()
    deadline = time.monotonic() + 10
    while free_slots(client) != total_slots(client):
        assert time.monotonic() < deadline, client.stat()
        time.sleep(0.02)
    # and the channel keeps working
    cons = client.consumer("bcast")
    with prod.loan(3) as t:
        t.publish()
    cons.recv(timeout=1.0).release()


def test_ctrl_c_interrupts_blocking_recv(broker):
    b = peer("block", broker.socket, "bcast")
    assert lines(b, 1) == ["ready"]
    time.sleep(0.2)
    start = time.monotonic()
    b.send_signal(signal.SIGINT)
    assert lines(b, 1) == ["interrupted"]
    assert b.wait(timeout=5) == 3
    assert time.monotonic() - start < 2
