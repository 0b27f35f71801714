"""Issue 11.2 and 11.3: close() and drop end a subscription at once (no
reliance on the cycle collector, under asyncio and uvloop), and every call
that waits releases the GIL and stays interruptible by signals."""

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import uvloop

import tensorbus as tb
from conftest import free_slots, peer, total_slots

LOOPS = ["asyncio", "uvloop"]


def new_loop(kind):
    return uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()


def run_on(kind, coro, timeout=30):
    loop = new_loop(kind)
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.close()


@pytest.fixture
def nogc():
    """No cyclic garbage collection during the test: nothing may depend on it."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()
    gc.collect()


def subscribers(client, channel):
    for c in client.stat()["channels"]:
        if c["name"] == channel:
            return len(c["subscribers"])
    raise KeyError(channel)


def publish_in_peer(broker, channel, n):
    """A producer in another process; returns once it published n (or fails after 20 s)."""
    p = peer("produce", broker.socket, channel, n, "int32")
    out, err = p.communicate(timeout=20)
    assert p.returncode == 0, err
    assert out.strip() == "done"


async def timed_out_wait(cons):
    with pytest.raises(tb.Timeout):
        await cons.recv_async(timeout=0.05)


# ---------------------------------------------------------------- 11.2 ---


@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize("ending", ["close", "del", "client_close", "del_both"])
def test_subscription_ends_after_a_timed_out_await(broker, nogc, kind, ending):
    client = tb.Client(broker.socket, name="ghost")
    cons = client.consumer("bcast", policy="block", depth=1)
    run_on(kind, timed_out_wait(cons))
    assert subscribers(client, "bcast") == 1
    if ending == "close":
        cons.close()
    elif ending == "del":
        del cons
    elif ending == "client_close":
        client.close()
    else:
        del cons
        del client
    with tb.Client(broker.socket, name="observer") as obs:
        assert subscribers(obs, "bcast") == 0, "a ghost subscriber stayed at the broker"
        # and a producer in another process is not stalled behind it (depth 1, block)
        publish_in_peer(broker, "bcast", 5)
        assert free_slots(obs) == total_slots(obs)


@pytest.mark.parametrize("kind", LOOPS)
def test_close_while_awaited_ends_the_subscription(broker, nogc, kind):
    client = tb.Client(broker.socket, name="ghost")
    cons = client.consumer("bcast", policy="block", depth=1)

    async def main():
        task = asyncio.ensure_future(cons.recv_async(timeout=10))
        await asyncio.sleep(0.05)
        cons.close()
        with pytest.raises(tb.Closed):
            await task

    run_on(kind, main())
    cons.close()
    client.close()
    with tb.Client(broker.socket, name="observer") as obs:
        assert subscribers(obs, "bcast") == 0
        publish_in_peer(broker, "bcast", 5)


@pytest.mark.parametrize("kind", LOOPS)
def test_cancelled_await_then_close(broker, nogc, kind):
    client = tb.Client(broker.socket, name="ghost")
    cons = client.consumer("bcast", policy="block", depth=1)

    async def main():
        task = asyncio.ensure_future(cons.recv_async())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_on(kind, main())
    cons.close()
    with tb.Client(broker.socket, name="observer") as obs:
        assert subscribers(obs, "bcast") == 0
    client.close()


def test_close_with_a_live_tensor_ends_deliveries_and_keeps_it(broker, client, nogc):
    """close() while a received tensor is alive: no more deliveries at once (a
    depth-1 block producer is not stalled), the tensor stays valid and held."""
    cons = client.consumer("bcast", policy="block", depth=1)
    prod = client.producer("bcast")
    with prod.loan((4,), "int32") as t:
        np.asarray(t)[...] = 7
        t.publish()
    held = cons.recv(timeout=5)
    cons.close()
    assert subscribers(client, "bcast") == 0
    for i in range(20):  # would stall at the second one behind a ghost of depth 1
        with prod.loan((4,), "int32", timeout=5.0) as t:
            np.asarray(t)[...] = i
            assert t.publish() == 0
    with pytest.raises(tb.Closed):
        cons.recv(timeout=0.1)
    assert int(np.asarray(held)[0]) == 7  # still readable, not overwritten
    assert free_slots(client) == total_slots(client) - 1
    held.release()
    assert free_slots(client) == total_slots(client)


def test_dropping_a_consumer_with_a_readiness_fd_ends_it(broker, client, nogc):
    cons = client.consumer("bcast", policy="block", depth=1)
    ready = cons._readiness()  # what an event loop keeps
    fd = ready.fileno()
    del cons
    assert subscribers(client, "bcast") == 0
    os.fstat(fd)  # the fd an event loop may still watch stays open
    assert ready.closed
    with pytest.raises(tb.Closed):
        ready.try_recv()
    del ready


def test_closing_a_stage_with_a_live_staged_tensor_ends_its_subscription(broker, client, nogc):
    """close() while a staged tensor is alive: the stage leaves its input at
    once (the next tensor goes to another worker, none waits for the closed
    one), and the staged tensor stays valid and can still be forwarded."""
    stage = client.stage("stage/in", "stage/out")
    out = client.consumer("stage/out", depth=8)
    src = client.producer("stage/in")
    for v in (1, 2):
        with src.loan((4,), "int32") as t:
            np.asarray(t)[...] = v
            t.publish()
    held = stage.recv_mut(timeout=5)  # 1; 2 stays queued for this stage
    worker = client.stage("stage/in", "stage/out")
    assert subscribers(client, "stage/in") == 2
    stage.close()
    assert stage.closed
    assert subscribers(client, "stage/in") == 1, "a closed stage stayed subscribed"
    with pytest.raises(tb.Closed):
        stage.recv_mut(timeout=0)
    # The tensor it had queued (2) and a new one (3) go to the other worker.
    with src.loan((4,), "int32") as t:
        np.asarray(t)[...] = 3
        t.publish()
    got = []
    for _ in range(2):
        with worker.recv_mut(timeout=5) as s:
            got.append(int(np.asarray(s)[0]))
            s.forward()
    assert sorted(got) == [2, 3]
    # The closed stage's tensor: still its bytes, still forwardable.
    assert int(np.asarray(held)[0]) == 1
    np.asarray(held)[...] += 10
    assert held.forward() == 1
    seen = sorted(int(np.asarray(out.recv(timeout=5))[0]) for _ in range(3))
    assert seen == [2, 3, 11]
    worker.close()
    assert free_slots(client) == total_slots(client)


@pytest.mark.parametrize("what", ["consumer", "stage"])
def test_close_from_another_thread_ends_a_blocking_recv(broker, client, nogc, what):
    """A thread blocked in recv()/recv_mut() raises Closed soon after another
    thread closes the handle; the subscription ends at once."""
    import threading

    channel = "bcast" if what == "consumer" else "stage/in"
    handle = client.consumer(channel) if what == "consumer" else client.stage(channel, "stage/out")
    wait = handle.recv if what == "consumer" else handle.recv_mut
    result = {}

    def blocked():
        start = time.monotonic()
        try:
            wait(timeout=30)
            result["got"] = "a tensor"
        except Exception as e:  # noqa: BLE001 - asserted below
            result["got"] = type(e).__name__
        result["s"] = time.monotonic() - start

    th = threading.Thread(target=blocked)
    th.start()
    time.sleep(0.2)  # well inside the wait
    closed_at = time.monotonic()
    handle.close()
    assert subscribers(client, channel) == 0
    th.join(10)
    assert not th.is_alive()
    assert result["got"] == "Closed", result
    assert result["s"] < 30 and time.monotonic() - closed_at < 2.0, result


# ---------------------------------------------------------------- 11.3 ---


THREADS = textwrap.dedent(
    """
    import json, sys, threading, time
    import numpy as np
    import tensorbus as tb
    sock, mode, policy, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    client = tb.Client(sock)
    cons = client.consumer(mode, policy=policy, depth=1)
    got = []

    def consume():
        while True:
            try:
                t = cons.recv(timeout=1.0)
            except tb.Timeout:
                return
            with t:
                got.append(int(np.asarray(t)[0]))
            time.sleep(0.002)

    th = threading.Thread(target=consume)
    th.start()
    prod = client.producer(mode)
    for i in range(n):
        with prod.loan((4,), "int32", timeout=5.0) as t:
            np.asarray(t)[...] = i
            t.publish()
    th.join()
    print(json.dumps(got), flush=True)
    """
)


@pytest.mark.parametrize("policy", ["block", "drop_oldest", "drop_newest", "latest"])
@pytest.mark.parametrize("mode", ["bcast", "work"])
def test_producer_and_consumer_threads_in_one_process(broker, client, policy, mode):
    """The main thread publishes into a depth-1 queue that a consumer thread
    drains slowly: a publish waiting for room must let the consumer run (it
    deadlocked holding the GIL). In a child process, so a deadlock fails the
    test instead of hanging it."""
    n = 40
    out = subprocess.run(
        [sys.executable, "-c", THREADS, broker.socket, mode, policy, str(n)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    if policy == "block":
        assert got == list(range(n))
    else:
        assert got and got == sorted(set(got)), got
        if policy != "drop_newest":
            assert got[-1] == n - 1, got  # the newest is never the one dropped
    assert free_slots(client) == total_slots(client)


SCRIPT = textwrap.dedent(
    """
    import os, sys, time, threading
    import numpy as np
    import tensorbus as tb
    sock, what = sys.argv[1], sys.argv[2]
    client = tb.Client(sock)
    if what == "publish":
        cons = client.consumer("bcast", policy="block", depth=1)   # never read
        prod = client.producer("bcast")
        prod.loan((4,), "int32").publish()                          # fills the queue
        t = prod.loan((4,), "int32")
        call = t.publish
    elif what == "forward":
        cons = client.consumer("stage/out", policy="block", depth=1)
        stage = client.stage("stage/in", "stage/out")
        src = client.producer("stage/in")
        src.loan((4,), "int32").publish()
        src.loan((4,), "int32").publish()
        stage.recv_mut(timeout=5).forward()                         # fills the queue
        t = stage.recv_mut(timeout=5)
        call = t.forward
    elif what == "recv":
        cons = client.consumer("bcast")
        call = cons.recv
    elif what == "loan":
        prod = client.producer("tiny")
        keep = [prod.loan((4,), "uint8")]
        p2 = client.producer("tiny")
        keep.append(p2.loan((4,), "uint8"))                         # the tiny pool has 2 slots
        p3 = client.producer("tiny")
        call = lambda: p3.loan((4,), "uint8", timeout=60)
    print("waiting", flush=True)
    try:
        call()
        print("returned", flush=True)
    except KeyboardInterrupt:
        print("interrupted", time.monotonic_ns(), flush=True)
        if what in ("publish", "forward"):
            # the tensor is still the caller's: its metadata is readable and it can be given back
            assert t.shape == (4,), t.shape
            t.release()
            print("kept", flush=True)
    """
)


@pytest.mark.parametrize("what", ["publish", "forward", "recv", "loan"])
def test_waiting_calls_are_interruptible(broker, what):
    """Ctrl-C interrupts publish/forward on a full block queue, recv and loan.

    The time from SIGINT to KeyboardInterrupt is printed (the promise is
    100 ms; a noisy CI machine gets a generous bound here, the figure is
    reported in the issue note)."""
    p = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, broker.socket, what],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout.readline().strip() == "waiting"
        time.sleep(0.3)  # well inside the wait
        sent = time.monotonic_ns()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        p.kill()
    lines = out.split()
    assert lines[:1] == ["interrupted"], (out, err)
    ms = (int(lines[1]) - sent) / 1e6
    print(f"{what}: KeyboardInterrupt {ms:.1f} ms after SIGINT")
    assert ms < 2000, ms
    if what in ("publish", "forward"):
        assert "kept" in lines, (out, err)
