"""Fork semantics (issue 12.4): a forked child's inherited handles are inert.

Using one raises ForkedChild ("opened by process PID before fork()"),
closing it or letting the interpreter's shutdown drop it leaves the
parent's producer, subscriber, loan, received tensor and readiness fd as
they were, and a child opens a client of its own (os.fork, and
multiprocessing with the fork and the spawn start methods). Before the fix
the child's normal exit closed the parent's producer and subscriber at the
broker: the parent's publish() then reached nobody, and its stale consumer
took tensors meant for another client's new subscriber.
"""

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import forker
import tensorbus as tb
from conftest import HERE, free_slots, total_slots


def run_forker(*args):
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "forker.py"), *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def next_report(p):
    line = p.stdout.readline()
    if not line:
        raise AssertionError(f"forker exited: rc={p.wait(30)} stderr={p.stderr.read()}")
    return json.loads(line)


def channel(stat, name):
    return next(c for c in stat["channels"] if c["name"] == name)


def drain(consumer):
    """The seqs queued now (the forker's producer may have closed: end of stream)."""
    seqs = []
    while True:
        try:
            t = consumer.try_recv()
        except tb.EndOfStream:
            return seqs
        if t is None:
            return seqs
        with t:
            seqs.append(t.seq)


def test_os_fork_child_exit_leaves_the_parents_handles_alone(broker, client):
    n = 5
    before = client.consumer("bcast", depth=8)  # another client's subscriber
    p = run_forker("handles", broker.socket, n)
    try:
        forker_id = next_report(p)["ready"]
        child = next_report(p)["child"]
        after_child = next_report(p)
        assert after_child["child_exit"] == 0, p.stderr.read()
        assert after_child["ready_fd"] == 0, "the child's arm/clear reached the parent's fd"

        # The parent's handles are all open at the broker, holding what they held.
        stat = client.stat()
        me = next(c for c in stat["clients"] if c["id"] == forker_id)
        assert me["handles"] == 4, stat  # producer, consumer, stage input and output
        assert me["holds"] == 2, stat  # the kept loan and the kept received tensor
        assert len(channel(stat, "bcast")["subscribers"]) == 2, stat
        assert channel(stat, "bcast")["producers"] == 1, stat
        assert len(channel(stat, "stage/in")["subscribers"]) == 1, stat
        assert not channel(stat, "tiny")["subscribers"], "the child's own client closed"

        # Another client subscribes now: before the fix it got the subscriber
        # slot the child had closed, which the parent's stale consumer read.
        after = client.consumer("bcast", depth=8)
        p.stdin.write("go\n")
        p.stdin.flush()
        parent = next_report(p)
        assert p.wait(30) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert parent["delivered"] == [3] * n, parent  # before, after, the parent's own
    assert parent["received"] == list(range(1, n + 1)), parent
    assert parent["kept_intact"], parent
    assert parent["ready_after"] == 1, parent
    assert drain(before) == list(range(0, n + 1))
    assert drain(after) == list(range(1, n + 1))
    before.close()
    after.close()
    assert free_slots(client) == total_slots(client)

    # What the child saw of its inherited handles.
    inert = f"opened by process {p.pid} before fork()"
    for what in [
        "stat",
        "loan",
        "publish",
        "recv",
        "try_recv",
        "numpy",
        "stage",
        "producer",
        "dropped",
        "arm",
        "clear",
    ]:
        got = child[what]
        assert got.startswith("ForkedChild: ") and inert in got, f"{what}: {got}"
    assert child["own"] == 7, "the child's own client works"


def test_forked_child_closing_an_embedded_broker_leaves_the_parents_running():
    with tempfile.TemporaryDirectory(prefix="tb-py-fork-") as d:
        p = run_forker("broker", d)
        try:
            r = next_report(p)
            closed = next_report(p)
            assert p.wait(30) == 0, p.stderr.read()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert r == {
        "child_exit": 0,
        "running": True,
        "socket": True,
        "stat_ok": True,
        "delivered": [1],
        "got": 5,
    }, r
    assert closed == {"socket_after_close": False}, "the parent's close still stops it"


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_child_opens_its_own_client(broker, client, method):
    ctx = multiprocessing.get_context(method)
    prod = client.producer("bcast")
    cons = client.consumer("bcast", depth=8)
    values = [3, 4, 5]
    if method == "fork":
        args = (broker.socket, client, prod, cons, values)
        proc = ctx.Process(target=forker.fork_child, args=args)
    else:
        proc = ctx.Process(target=forker.spawn_child, args=(broker.socket, values))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0, f"the {method} child failed (its traceback is above)"

    # The child's tensors reached the parent's consumer ...
    got = []
    for _ in values:
        with cons.recv(timeout=5.0) as t:
            got.append(int(np.asarray(t)[0]))
    assert got == values
    # ... and the parent's handles work on, still registered at the broker.
    stat = client.stat()
    assert len(channel(stat, "bcast")["subscribers"]) == 1, stat
    assert channel(stat, "bcast")["producers"] == 1, stat
    assert forker.publish_values(prod, [9]) == [1]
    with cons.recv(timeout=5.0) as t:
        assert int(np.asarray(t)[0]) == 9
    assert any(c["id"] == client.id for c in client.stat()["clients"])
    cons.close()
    prod.close()
    assert free_slots(client) == total_slots(client)
