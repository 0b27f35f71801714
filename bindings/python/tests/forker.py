"""Fork helpers of test_fork.py (issue 12.4, fork semantics).

    forker.py handles SOCKET N   opens handles on SOCKET's broker and forks; the
                                 child tries every inherited handle, opens a
                                 client of its own and exits normally (the
                                 interpreter's shutdown runs the destructors);
                                 after a "go" line the parent publishes N
                                 tensors and receives them
    forker.py broker DIR         runs an embedded broker in DIR and forks; the
                                 child closes its copy of the broker and exits
                                 normally; the parent's broker must still serve

Every report is one JSON line on stdout. The functions `fork_child` and
`spawn_child` are multiprocessing targets of test_fork.py.
"""

import json
import os
import select
import sys

import numpy as np

import tensorbus as tb


def attempt(fn):
    """'ok', or 'ErrorType: message'."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 (reported, asserted by the test)
        return f"{type(e).__name__}: {e}"
    return "ok"


def readable(fd, timeout):
    return int(bool(select.select([fd], [], [], timeout)[0]))


def report(**kw):
    print(json.dumps(kw), flush=True)


def publish_values(producer, values):
    """Publishes one 4-byte tensor per value (every byte = the value)."""
    out = []
    for v in values:
        with producer.loan(4, timeout=10.0) as t:
            np.asarray(t)[:] = v
            out.append(t.publish())
    return out


def handles(sock, n):
    client = tb.Client(sock, name="forker")
    prod = client.producer("bcast")
    cons = client.consumer("bcast", depth=8)
    stage = client.stage("stage/in", "stage/out")
    ready = cons._readiness()  # the asyncio readiness: an eventfd and a thread
    publish_values(prod, [0])
    kept = cons.recv(timeout=5.0)  # a received tensor, kept across the fork
    kept_arr = np.asarray(kept)  # with a numpy view of it
    kept_sum = int(kept_arr.sum())
    ready.arm()
    loan = prod.loan(4)  # a loan, kept across the fork
    np.asarray(loan)[:] = 1
    report(ready=client.id)
    pid = os.fork()
    if pid == 0:
        res = {
            "stat": attempt(client.stat),
            "loan": attempt(lambda: prod.loan(4)),
            "publish": attempt(loan.publish),
            "recv": attempt(lambda: cons.recv(timeout=0.1)),
            "try_recv": attempt(cons.try_recv),
            "numpy": attempt(lambda: np.asarray(kept)),
            "stage": attempt(lambda: stage.recv_mut(timeout=0.1)),
            "producer": attempt(lambda: client.producer("bcast")),
            "dropped": attempt(lambda: cons.dropped),
            "arm": attempt(ready.arm),
            "clear": attempt(ready.clear),
        }
        prod.close()  # closed explicitly; the rest goes with the destructors
        with tb.Client(sock, name="forker-child") as own:
            with own.producer("tiny") as p2, own.consumer("tiny") as c2:
                publish_values(p2, [7])
                with c2.recv(timeout=5.0) as t:
                    res["own"] = int(np.asarray(t)[0])
        report(child=res)
        sys.exit(0)  # a normal exit: the interpreter's shutdown drops everything
    _, status = os.waitpid(pid, 0)
    report(child_exit=os.waitstatus_to_exitcode(status), ready_fd=readable(ready.fileno(), 0))
    sys.stdin.readline()  # "go": the test opened another client's subscriber
    delivered = [loan.publish()] + publish_values(prod, range(2, n + 1))
    ready_after = readable(ready.fileno(), 5.0)
    received = []
    for _ in range(n):
        with cons.recv(timeout=5.0) as t:
            received.append(t.seq)
    intact = int(kept_arr.sum()) == kept_sum and kept.seq == 0
    del kept_arr
    kept.release()
    report(delivered=delivered, received=received, kept_intact=intact, ready_after=ready_after)
    stage.close()
    cons.close()
    prod.close()
    client.close()


def broker(d):
    sock = os.path.join(d, "broker.sock")
    b = tb.Broker(None, sock)
    client = tb.Client(sock, name="broker-forker")
    prod = client.producer("f/x", create=True)
    cons = client.consumer("f/x")
    pid = os.fork()
    if pid == 0:
        b.close()  # the child's copy: must leave the parent's broker running
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    with tb.Client(sock, name="after-fork") as other:
        stat_ok = bool(other.stat()["clients"])
    delivered = publish_values(prod, [5])
    with cons.recv(timeout=5.0) as t:
        got = int(np.asarray(t)[0])
    report(
        child_exit=os.waitstatus_to_exitcode(status),
        running=b.running,
        socket=os.path.exists(sock),
        stat_ok=stat_ok,
        delivered=delivered,
        got=got,
    )
    cons.close()
    prod.close()
    client.close()
    b.close()
    report(socket_after_close=os.path.exists(sock))


def fork_child(sock, client, prod, cons, values):
    """multiprocessing target (fork): the parent's handles came along."""
    for what, fn in [
        ("stat", client.stat),
        ("loan", lambda: prod.loan(4)),
        ("recv", lambda: cons.recv(timeout=0.1)),
        ("try_recv", cons.try_recv),
        ("producer", lambda: client.producer("bcast")),
    ]:
        got = attempt(fn)
        assert got.startswith("ForkedChild: ") and "before fork()" in got, f"{what}: {got}"
    cons.close()
    prod.close()
    client.close()
    with tb.Client(sock, name="mp-fork-child") as own, own.producer("bcast") as p:
        publish_values(p, values)


def spawn_child(sock, values):
    """multiprocessing target (spawn): a fresh interpreter."""
    with tb.Client(sock, name="mp-spawn-child") as own, own.producer("bcast") as p:
        publish_values(p, values)


if __name__ == "__main__":
    if sys.argv[1] == "handles":
        handles(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "broker":
        broker(sys.argv[2])
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")
