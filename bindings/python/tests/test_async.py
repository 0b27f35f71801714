"""asyncio: await consumer.recv_async() and async for, on the consumer's
readiness eventfd (loop.add_reader), across processes and in process."""

import asyncio
import json
import threading
import time

import numpy as np
import pytest

import tensorbus as tb
from conftest import free_slots, peer, total_slots


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def publish(client, channel, n=1, start=0, shape=(3, 5)):
    prod = client.producer(channel)
    for i in range(n):
        with prod.loan(shape, "int32", timeout=5.0) as t:
            np.asarray(t)[...] = start + i
            t.publish()
    prod.close()


def watched(loop, cons):
    """Whether the loop still watches the consumer's readiness fd."""
    fd = cons._readiness().fileno()
    if loop.remove_reader(fd):
        raise AssertionError("the readiness fd was still watched")
    return False


def test_recv_async_across_processes(broker, client):
    n = 20
    cons = client.consumer("bcast", depth=8)

    async def main():
        p = peer("produce", broker.socket, "bcast", n, "int32")
        got = []
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        tick = asyncio.create_task(ticker())
        for _ in range(n):
            t = await cons.recv_async(timeout=20)
            with t:
                got.append((t.seq, int(np.asarray(t)[0, 0]), t.user_header))
        tick.cancel()
        assert p.wait(timeout=20) == 0, p.stderr.read()
        return got, ticks

    got, ticks = run(main())
    assert [g[0] for g in got] == list(range(n))
    assert [g[1] for g in got] == list(range(n))
    assert [g[2] for g in got] == [f"peer:{i}".encode() for i in range(n)]
    assert ticks > 0  # the loop kept running while we waited
    assert free_slots(client) == total_slots(client)


def test_recv_async_returns_at_once_when_queued(client):
    cons = client.consumer("bcast")
    publish(client, "bcast", 2)

    async def main():
        a = await cons.recv_async()
        b = await cons.recv_async(timeout=0)
        return a.seq, b.seq

    assert run(main()) == (0, 1)


def test_recv_async_timeout_raises_timeout_and_cleans_up(client):
    cons = client.consumer("bcast")

    async def main():
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        with pytest.raises(tb.Timeout) as e:
            await cons.recv_async(timeout=0.1)
        took = time.monotonic() - start
        assert isinstance(e.value, TimeoutError)
        assert isinstance(e.value, asyncio.TimeoutError)
        assert "bcast" in str(e.value)
        assert not watched(loop, cons)
        # nothing lost afterwards
        publish(client, "bcast")
        t = await cons.recv_async(timeout=5)
        return took, t.seq

    took, seq = run(main())
    assert 0.09 <= took < 2.0 and seq == 0


def test_recv_async_bad_timeout(client):
    cons = client.consumer("bcast")

    async def main():
        with pytest.raises(ValueError):
            await cons.recv_async(timeout=-1)
        with pytest.raises(TypeError):
            await cons.recv_async(timeout="soon")

    run(main())


def test_cancellation_is_clean_and_loses_nothing(client):
    # publish() closes its producer (the stream ends): stay subscribed.
    cons = client.consumer("bcast", end_of_stream=False)

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(cons.recv_async())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not watched(loop, cons)
        publish(client, "bcast")
        # the tensor was not swallowed by the cancelled wait
        t = cons.try_recv()
        assert t is not None and t.seq == 0
        t.release()
        # and the consumer still works asynchronously
        waiter = asyncio.create_task(cons.recv_async(timeout=5))
        await asyncio.sleep(0.02)
        publish(client, "bcast", start=1)
        return (await waiter).seq

    assert run(main()) == 0  # a new producer starts at seq 0


def test_cancelled_waiter_hands_its_turn_on(client):
    cons = client.consumer("bcast")

    async def main():
        a = asyncio.create_task(cons.recv_async(timeout=5))
        b = asyncio.create_task(cons.recv_async(timeout=5))
        await asyncio.sleep(0.02)
        publish(client, "bcast")
        # cancel the first waiter whether or not it was woken already
        a.cancel()
        t = await b
        with pytest.raises(asyncio.CancelledError):
            await a
        return t.seq

    assert run(main()) == 0


def test_many_consumers_on_one_loop(client):
    consumers = [client.consumer("bcast", depth=4) for _ in range(10)]

    async def main():
        tasks = [asyncio.create_task(c.recv_async(timeout=10)) for c in consumers]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in tasks)
        threading.Thread(target=publish, args=(client, "bcast", 2)).start()
        first = await asyncio.gather(*tasks)
        second = await asyncio.gather(*(c.recv_async(timeout=10) for c in consumers))
        return [t.seq for t in first], [t.seq for t in second]

    first, second = run(main())
    assert first == [0] * 10 and second == [1] * 10


def test_concurrent_waits_on_one_consumer_share_the_tensors(client):
    cons = client.consumer("bcast", depth=8, end_of_stream=False)  # one producer per publish()
    n = 6

    async def main():
        tasks = [asyncio.create_task(cons.recv_async(timeout=10)) for _ in range(n)]
        await asyncio.sleep(0.02)
        for i in range(n):
            publish(client, "bcast", start=i)
            await asyncio.sleep(0.001)
        got = await asyncio.gather(*tasks)
        return sorted(int(np.asarray(t)[0, 0]) for t in got)

    assert run(main()) == list(range(n))


def test_workqueue_from_another_process(broker, client):
    cons = client.consumer("work", depth=8)
    n = 10

    async def main():
        p = peer("produce", broker.socket, "work", n, "float32")
        got = [await cons.recv_async(timeout=20) for _ in range(n)]
        assert p.wait(timeout=20) == 0
        return [t.seq for t in got]

    assert run(main()) == list(range(n))


def test_consumer_closed_while_awaiting_raises_closed(client):
    cons = client.consumer("bcast")

    async def main():
        tasks = [asyncio.create_task(cons.recv_async()) for _ in range(3)]
        await asyncio.sleep(0.05)
        cons.close()
        for t in tasks:
            with pytest.raises(tb.Closed, match="closed"):
                await t
        with pytest.raises(tb.Closed):
            await cons.recv_async()

    run(main())


def test_client_closed_while_awaiting_raises_closed(broker):
    client = tb.Client(broker.socket)
    cons = client.consumer("bcast")

    async def main():
        task = asyncio.create_task(cons.recv_async(timeout=10))
        await asyncio.sleep(0.05)
        client.close()
        with pytest.raises(tb.Closed):
            await task

    run(main())


def test_close_from_another_thread_wakes_the_loop(client):
    cons = client.consumer("bcast")

    async def main():
        threading.Timer(0.1, cons.close).start()
        start = time.monotonic()
        with pytest.raises(tb.Closed):
            await cons.recv_async(timeout=10)
        return time.monotonic() - start

    assert run(main()) < 5


def test_async_for_until_closed(client):
    cons = client.consumer("bcast", depth=8, end_of_stream=False)  # one producer per publish()

    async def main():
        seqs = []

        async def feed():
            for i in range(3):
                await asyncio.sleep(0.01)
                publish(client, "bcast", start=i)
            await asyncio.sleep(0.05)
            cons.close()

        f = asyncio.create_task(feed())
        async for t in cons:
            seqs.append(t.seq)
            t.release()
        await f
        return seqs

    assert run(main()) == [0, 0, 0]  # one producer per publish() call


def test_other_event_loop_is_refused_while_one_waits(client):
    cons = client.consumer("bcast")
    started = threading.Event()
    result = {}

    async def first():
        task = asyncio.create_task(cons.recv_async(timeout=5))
        started.set()
        return (await task).seq

    def other():
        started.wait(5)
        time.sleep(0.05)

        async def second():
            with pytest.raises(tb.Busy):
                await cons.recv_async(timeout=1)

        try:
            asyncio.run(second())
            result["ok"] = True
        except BaseException as e:  # noqa: BLE001 - reported below
            result["err"] = e
        publish(client, "bcast")

    th = threading.Thread(target=other)
    th.start()
    assert run(first()) == 0
    th.join()
    assert result == {"ok": True}


def test_stage_output_awaited(client):
    """A typical async pipeline end: a stage in a thread, results awaited."""
    stage = client.stage("stage/in", "stage/out")
    out = client.consumer("stage/out", depth=8)

    def worker():
        for _ in range(3):
            with stage.recv_mut(timeout=5) as s:
                np.asarray(s)[:] += 100
                s.forward()

    th = threading.Thread(target=worker)
    th.start()

    async def main():
        publish(client, "stage/in", 3, shape=(4,))
        return [int(np.asarray(await out.recv_async(timeout=5))[0]) for _ in range(3)]

    assert sorted(run(main())) == [100, 101, 102]
    th.join()


def test_peer_json_lines_still_work(broker, client):
    """The async path and the blocking path see the same stream."""
    c = peer("consume", broker.socket, "bcast", 2)
    assert c.stdout.readline().strip() == "ready"
    cons = client.consumer("bcast", depth=8)

    async def main():
        publish(client, "bcast", 2)
        return [(await cons.recv_async(timeout=5)).seq for _ in range(2)]

    assert run(main()) == [0, 1]
    got = [json.loads(c.stdout.readline())["seq"] for _ in range(2)]
    assert got == [0, 1]
    assert c.wait(timeout=10) == 0
