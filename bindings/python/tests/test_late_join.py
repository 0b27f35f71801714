"""Late joiners and the end of a stream (issue 14.1), from Python.

* History: a subscriber that joins late first receives the channel's last
  N tensors, in order, also after their producer closed (`history = N` in
  the config, `history=N` at creation).
* `client.consumer(name, wait=True | seconds)` waits for a channel that
  does not exist yet and receives from its first tensor on; a finite wait
  raises `tb.Timeout`; a signal handler's exception (Ctrl-C) ends the wait.
* End of stream: once the channel's last producer closed cleanly and the
  queue is drained, `recv`/`try_recv`/`recv_async`/`recv_mut` raise
  `tb.EndOfStream` and iteration stops; a crashed producer ends nothing;
  `end_of_stream=False` opts out.
* `client.remove_channel(name)`.
"""

import asyncio
import json
import os
import signal
import tempfile
import threading
import time
import warnings

import numpy as np
import pytest

import tensorbus as tb
from conftest import free_slots, peer, total_slots

HISTORY_CONFIG = """
[[pools]]
name = "small"
slot_size = 4096
slots = 16

[[channels]]
name = "cam"
history = 3

[[channels]]
name = "plain"
"""


@pytest.fixture
def hclient():
    with tempfile.TemporaryDirectory(prefix="tb-py-late-") as d:
        with tb.Broker(HISTORY_CONFIG, os.path.join(d, "broker.sock")) as b:
            with tb.Client(b.socket, name="late") as c:
                yield c


def publish(prod, value):
    with prod.loan((4,), "uint8", timeout=10.0) as t:
        np.asarray(t)[:] = value
        return t.publish()


def value(t):
    with t:
        return int(np.asarray(t)[0])


def channel(client, name):
    for c in client.stat()["channels"]:
        if c["name"] == name:
            return c
    return None


def wait_until(what, cond, timeout=10.0):
    """Polls `cond` until it holds (a deadline only against hanging, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.005)


def drain(cons):
    """Values queued now; stops at nothing queued or at end of stream."""
    got = []
    while True:
        try:
            t = cons.try_recv()
        except tb.EndOfStream:
            return got
        if t is None:
            return got
        got.append(value(t))


# ------------------------------------------------------------- history ---


def test_a_late_subscriber_first_gets_the_last_n_in_order(hclient):
    cam = hclient.producer("cam")
    for v in range(1, 6):
        publish(cam, v)
    # The config's history = 3 keeps the three newest (they hold slots).
    ch = channel(hclient, "cam")
    assert (ch["history"], ch["history_held"]) == (3, 3)
    assert free_slots(hclient) == total_slots(hclient) - 3
    late = hclient.consumer("cam")
    publish(cam, 6)
    assert [value(late.recv(timeout=5)) for _ in range(4)] == [3, 4, 5, 6]
    assert late.try_recv() is None  # the producer is open: no end of stream
    # Without history a late subscriber only gets what comes after it.
    plain = hclient.producer("plain")
    publish(plain, 1)
    c = hclient.consumer("plain")
    publish(plain, 2)
    assert drain(c) == [2]
    assert channel(hclient, "plain")["history"] == 0


def test_history_outlives_its_producer_then_the_stream_ends(hclient):
    cam = hclient.producer("cam")
    for v in (42, 43):
        publish(cam, v)
    cam.close()
    late = hclient.consumer("cam")
    assert value(late.recv(timeout=5)) == 42
    assert value(late.recv(timeout=5)) == 43
    with pytest.raises(tb.EndOfStream):
        late.recv(timeout=5)
    assert channel(hclient, "cam")["ended"] is True


def test_history_at_run_time_creation(client):
    prod = client.producer("late/calib", create=True, history=1)
    publish(prod, 7)
    publish(prod, 8)
    first = client.consumer("late/calib")
    assert value(first.recv(timeout=5)) == 8  # the newest one
    ch = channel(client, "late/calib")
    assert (ch["history"], ch["history_held"], ch["ended"], ch["pending"]) == (1, 1, False, False)
    # A consumer may create the channel with a history too.
    c = client.consumer("late/made", create=True, history=2)
    assert channel(client, "late/made")["history"] == 2
    c.close()
    # history needs create=True; a work queue has none.
    with pytest.raises(ValueError, match="create=True"):
        client.producer("bcast", history=2)
    with pytest.raises(ValueError, match="create=True"):
        client.consumer("bcast", history=2)
    with pytest.raises(tb.InvalidArgument, match="broadcast channels only"):
        client.producer("late/wq", create=True, mode="workqueue", history=1)


# ------------------------------------------------------ wait for channel ---


def test_a_waiting_consumer_in_a_thread_gets_every_tensor_from_the_first(client):
    got = []
    errors = []

    def waiter():
        try:
            cons = client.consumer("later/raw", wait=True)
            for t in cons:  # until end of stream
                got.append(value(t))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    th = threading.Thread(target=waiter)
    th.start()
    # The waiting subscription is registered: the channel shows as pending.
    wait_until("a pending channel", lambda: (channel(client, "later/raw") or {}).get("pending"))
    prod = client.producer("later/raw", create=True)
    delivered = [publish(prod, v) for v in range(50)]
    prod.close()
    th.join(30)
    assert not th.is_alive() and not errors, errors
    assert delivered == [1] * 50  # the first publish already reached the waiter
    assert got == list(range(50))


def test_a_waiting_consumer_in_another_process(broker, client):
    p = peer("waitconsume", broker.socket, "later/proc")
    try:
        wait_until("a pending channel", lambda: (channel(client, "later/proc") or {}).get("pending"))
        prod = client.producer("later/proc", create=True)
        for v in range(20):
            publish(prod, v)
        prod.close()
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert out.split() == [str(v) for v in range(20)] + ["end"]


def test_a_finite_wait_times_out(client):
    start = time.monotonic()
    with pytest.raises(tb.Timeout, match="later/never") as e:
        client.consumer("later/never", wait=0.2)
    assert time.monotonic() - start >= 0.2
    assert isinstance(e.value, TimeoutError)
    # The name it reserved while waiting goes away.
    wait_until("the pending channel removed", lambda: channel(client, "later/never") is None)
    # Without a wait: ChannelNotFound at once.
    for no in (False, None, 0, 0.0):
        with pytest.raises(tb.ChannelNotFound):
            client.consumer("later/never", wait=no)
    # A stage waits for its input the same way.
    with pytest.raises(tb.Timeout):
        client.stage("later/never-in", "stage/out", wait=0.2)


def test_wait_arguments(client):
    with pytest.raises(ValueError):
        client.consumer("bcast", wait=-1)
    with pytest.raises(ValueError):
        client.consumer("bcast", wait=float("nan"))
    with pytest.raises(TypeError, match="wait_strategy"):
        client.consumer("bcast", wait=[1])
    with pytest.raises(TypeError):
        client.stage("stage/in", "stage/out", wait="park")
    # An existing channel does not wait, whatever the wait.
    client.consumer("bcast", wait=True).close()
    client.consumer("bcast", wait=1e300).close()
    client.consumer("bcast", wait=float("inf")).close()
    # The wait strategy: wait_strategy=, or (deprecated) a string wait=.
    client.consumer("bcast", wait_strategy="park").close()
    with pytest.warns(DeprecationWarning, match="wait_strategy"):
        client.consumer("bcast", wait="busy").close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(tb.InvalidArgument, match="wait strategy"):
            client.consumer("bcast", wait="soon")
        with pytest.raises(ValueError, match="wait_strategy"):
            client.consumer("bcast", wait="busy", wait_strategy="park")


def test_a_signal_handlers_exception_ends_an_endless_wait(client):
    class Alarm(Exception):
        pass

    def ring(signum, frame):
        raise Alarm()

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    try:
        with pytest.raises(Alarm):
            client.consumer("later/alarm", wait=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    # The waiting subscription was withdrawn.
    wait_until("the pending channel removed", lambda: channel(client, "later/alarm") is None)


def test_ctrl_c_interrupts_an_endless_wait(broker, client):
    p = peer("waitblock", broker.socket, "later/ctrlc")
    try:
        wait_until("a pending channel", lambda: (channel(client, "later/ctrlc") or {}).get("pending"))
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 3, err
    assert out.split() == ["interrupted"]
    wait_until("the pending channel removed", lambda: channel(client, "later/ctrlc") is None)


def test_a_signal_ends_a_waiting_stage_too(client):
    class Alarm(Exception):
        pass

    def ring(signum, frame):
        raise Alarm()

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    try:
        with pytest.raises(Alarm):
            client.stage("later/stage-alarm", "stage/out", wait=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    wait_until("the pending channel removed", lambda: channel(client, "later/stage-alarm") is None)


def test_closing_the_client_ends_its_wait(broker):
    c = tb.Client(broker.socket)
    threading.Timer(0.2, c.close).start()
    with pytest.raises(tb.Closed):
        c.consumer("later/closed", wait=True)


def test_a_waiting_stage_gets_every_tensor(client):
    got = []
    errors = []
    sink = client.consumer("stage/out")

    def worker():
        try:
            stage = client.stage("later/in", "stage/out", wait=30)
            while True:
                try:
                    t = stage.recv_mut(timeout=30)
                except tb.EndOfStream:
                    break
                with t:
                    got.append(int(np.asarray(t)[0]))
                    np.asarray(t)[:] += 100
                    t.forward()
            stage.close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    th = threading.Thread(target=worker)
    th.start()
    wait_until("a pending channel", lambda: (channel(client, "later/in") or {}).get("pending"))
    prod = client.producer("later/in", create=True, mode="workqueue", pools=["small"])
    for v in range(6):  # the sink (depth 8) is read afterwards
        publish(prod, v)
    prod.close()
    th.join(30)
    assert not th.is_alive() and not errors, errors
    assert got == list(range(6))
    # The stage's close ended its output's stream too.
    assert [value(t) for t in sink] == [100 + v for v in range(6)]


# ---------------------------------------------------------- end of stream ---


def test_end_of_stream_after_the_queue_is_drained(client):
    cons = client.consumer("bcast")
    assert cons.try_recv() is None  # no producer yet: not an end
    a = client.producer("bcast")
    b = client.producer("bcast")
    publish(a, 1)
    a.close()
    assert value(cons.recv(timeout=5)) == 1
    assert cons.try_recv() is None  # one producer is left
    publish(b, 2)
    publish(b, 3)
    b.close()
    # What is queued comes first, then the end, from recv and try_recv.
    assert value(cons.recv(timeout=5)) == 2
    assert value(cons.try_recv()) == 3
    with pytest.raises(tb.EndOfStream, match="bcast") as e:
        cons.recv(timeout=5)
    assert isinstance(e.value, tb.TensorbusError) and isinstance(e.value, EOFError)
    with pytest.raises(tb.EndOfStream):
        cons.try_recv()
    with pytest.raises(tb.EndOfStream):
        cons.recv()  # no timeout: still at once
    assert list(cons) == []  # iteration just stops
    assert channel(client, "bcast")["ended"] is True
    # A new producer starts a new stream.
    c = client.producer("bcast")
    assert cons.try_recv() is None
    publish(c, 4)
    assert value(cons.recv(timeout=5)) == 4
    assert channel(client, "bcast")["ended"] is False


def test_iteration_ends_at_end_of_stream(client):
    cons = client.consumer("bcast", depth=8)

    def feed():
        prod = client.producer("bcast")
        for v in range(20):
            publish(prod, v)
        prod.close()

    th = threading.Thread(target=feed)
    th.start()
    got = [value(t) for t in cons]  # StopIteration at the end of the stream
    th.join()
    assert got == list(range(20))
    assert not cons.closed


def test_a_blocked_recv_wakes_at_end_of_stream(client):
    cons = client.consumer("bcast", wait_strategy="park")
    prod = client.producer("bcast")
    result = []

    def blocked():
        try:
            cons.recv()
        except BaseException as e:  # noqa: BLE001 - checked below
            result.append(e)

    th = threading.Thread(target=blocked)
    th.start()
    time.sleep(0.1)  # (not needed for correctness: the end comes either way)
    prod.close()
    th.join(30)
    assert not th.is_alive()
    assert len(result) == 1 and isinstance(result[0], tb.EndOfStream), result


def test_async_end_of_stream(client):
    cons = client.consumer("bcast", depth=8)

    async def main():
        prod = client.producer("bcast")
        waiters = [asyncio.create_task(cons.recv_async(timeout=10)) for _ in range(3)]
        await asyncio.sleep(0.02)
        publish(prod, 1)
        prod.close()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        tensors = [r for r in results if isinstance(r, tb.Tensor)]
        ends = [r for r in results if isinstance(r, tb.EndOfStream)]
        assert [value(t) for t in tensors] == [1] and len(ends) == 2, results
        with pytest.raises(tb.EndOfStream):
            await cons.recv_async()
        # async for stops at the end of a stream
        prod = client.producer("bcast")
        for v in range(5):
            publish(prod, v)
        prod.close()
        return [value(t) async for t in cons]

    assert asyncio.run(asyncio.wait_for(main(), 30)) == list(range(5))


def test_a_crashed_producer_ends_nothing(broker, client):
    cons = client.consumer("bcast", depth=8)
    p = peer("publish_hang", broker.socket, "bcast", 3)
    try:
        assert p.stdout.readline().strip() == "done"
        assert [value(cons.recv(timeout=10)) for _ in range(3)] == [0, 1, 2]
        p.kill()  # SIGKILL: no clean close
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    # The broker reclaims the dead producer; the stream did not end.
    wait_until("the dead producer reclaimed", lambda: channel(client, "bcast")["producers"] == 0)
    assert channel(client, "bcast")["ended"] is False
    with pytest.raises(tb.Timeout):
        cons.recv(timeout=0.2)
    assert cons.try_recv() is None
    # A clean producer afterwards does end it.
    prod = client.producer("bcast")
    publish(prod, 9)
    prod.close()
    assert value(cons.recv(timeout=5)) == 9
    with pytest.raises(tb.EndOfStream):
        cons.recv(timeout=5)


def test_end_of_stream_false_keeps_waiting(client):
    service = client.consumer("bcast", end_of_stream=False)
    prod = client.producer("bcast")
    publish(prod, 1)
    prod.close()
    assert value(service.recv(timeout=5)) == 1
    with pytest.raises(tb.Timeout):
        service.recv(timeout=0.1)
    assert service.try_recv() is None

    async def main():
        with pytest.raises(tb.Timeout):
            await service.recv_async(timeout=0.1)

    asyncio.run(main())
    stage = client.stage("stage/in", "stage/out", end_of_stream=False)
    prod = client.producer("stage/in")
    publish(prod, 2)
    prod.close()
    with stage.recv_mut(timeout=5) as t:
        assert int(np.asarray(t)[0]) == 2
    with pytest.raises(tb.Timeout):
        stage.recv_mut(timeout=0.1)


def test_a_stage_sees_end_of_stream(client):
    sink = client.consumer("stage/out", depth=8)
    stage = client.stage("stage/in", "stage/out")
    prod = client.producer("stage/in")
    for v in range(5):
        publish(prod, v)
    prod.close()
    n = 0
    while True:
        try:
            t = stage.recv_mut(timeout=10)
        except tb.EndOfStream as e:
            assert "stage/in" in str(e)
            break
        with t:
            np.asarray(t)[:] += 10
            t.forward()
        n += 1
    assert n == 5
    with pytest.raises(tb.EndOfStream):
        stage.recv_mut(timeout=0)
    stage.close()  # its output producer closes: the next channel ends too
    assert [value(t) for t in sink] == [10, 11, 12, 13, 14]


# --------------------------------------------------------- remove_channel ---


def test_remove_channel(client):
    prod = client.producer("tmp/x", create=True, pools=["small"], history=2)
    publish(prod, 1)
    publish(prod, 2)
    assert free_slots(client) == total_slots(client) - 2
    with pytest.raises(tb.Busy, match="in use"):
        client.remove_channel("tmp/x")
    prod.close()
    client.remove_channel("tmp/x")
    assert free_slots(client) == total_slots(client)  # the history's holds are released
    assert channel(client, "tmp/x") is None
    with pytest.raises(tb.ChannelNotFound) as e:
        client.remove_channel("tmp/x")
    assert isinstance(e.value, LookupError)
    with pytest.raises(tb.PermissionDenied, match="declared in the broker config"):
        client.remove_channel("bcast")
    # The name can be made again, fresh.
    prod = client.producer("tmp/x", create=True)
    cons = client.consumer("tmp/x")
    publish(prod, 9)
    assert value(cons.recv(timeout=5)) == 9
    assert channel(client, "tmp/x")["history"] == 0
    client.close()
    with pytest.raises(tb.Closed):
        client.remove_channel("tmp/x")


def test_stat_reports_the_new_channel_fields(client):
    ch = channel(client, "bcast")
    assert {"history", "history_held", "ended", "pending"} <= set(ch)
    assert (ch["history"], ch["history_held"], ch["ended"], ch["pending"]) == (0, 0, False, False)
    # (json round trip: plain ints and bools)
    assert json.loads(json.dumps(ch)) == ch
