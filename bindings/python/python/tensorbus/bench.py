"""Cross-process transport benchmark: ``python -m tensorbus.bench [--quick] [--json FILE]``.

Two processes (multiprocessing, spawn). The sender fully writes a uint8
frame (``a[:] = i & 255``) and sends it; the receiver reads every byte
(``int(a.sum())``) and answers with the checksum, which the sender verifies.
One round trip (write + send + read + acknowledge) is one sample. Transports
run in alternating rounds so that drift in the machine affects all alike.

Transports: tensorbus (embedded broker, loan/publish/recv), multiprocessing.Queue
(pickles the array), multiprocessing.shared_memory + Pipe (a shared buffer and
a small notice), pyzmq PAIR over ipc:// with copy=False (if importable) and
iceoryx2 publish-subscribe slices (if importable; its Python API has no
blocking receive, so both sides poll ``receive()``).
"""

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

import numpy as np

MiB = 1 << 20
SIZES = (0, MiB, 16 * MiB)
TRANSPORTS = ("tensorbus", "mp.Queue", "shm+Pipe", "zmq", "iceoryx2")
STOP = -1

TB_CONFIG = """
[[pools]]
name = "small"
slot_size = 4096
slots = 8

[[pools]]
name = "big"
slot_size = "16MiB"
slots = 4

[[channels]]
name = "bench/ping"
pools = ["small", "big"]

[[channels]]
name = "bench/pong"
pools = ["small"]
"""


def _poll(fn):
    """Spins on fn() for 10 ms, then polls every 100 µs (iceoryx2 has no blocking receive)."""
    t0 = time.perf_counter()
    while True:
        r = fn()
        if r is not None:
            return r
        if time.perf_counter() - t0 > 0.01:
            time.sleep(0.0001)


# --- the echo sides (child processes) --------------------------------------


def _echo_tensorbus(ready, socket):
    import tensorbus as tb

    c = tb.Client(socket, name="bench-echo")
    # Busy-poll, like iceoryx2's Python side (it has no blocking receive).
    cons = c.consumer("bench/ping", depth=4, policy="block", wait_strategy="busy")
    prod = c.producer("bench/pong")
    ready.put("tensorbus")
    while True:
        with cons.recv() as t:
            a = np.asarray(t)
            s = int(a.sum()) if a.size else 0
            stop = t.user_header[:1] == b"S"
            del a
        with prod.loan(1, "int64") as r:
            np.asarray(r)[0] = s
            r.publish()
        if stop:
            return


def _echo_queue(ready, inq, outq):
    ready.put("mp.Queue")
    while True:
        a = inq.get()
        if a is None:
            outq.put(0)
            return
        outq.put(int(a.sum()) if a.size else 0)


def _echo_shm(ready, conn, shm_name):
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(shm_name)
    buf = np.ndarray((16 * MiB,), np.uint8, shm.buf)
    ready.put("shm+Pipe")
    while True:
        n = int.from_bytes(conn.recv_bytes(), "little", signed=True)
        if n < 0:
            conn.send_bytes(b"\0")
            break
        s = int(buf[:n].sum()) if n else 0
        conn.send_bytes(s.to_bytes(8, "little"))
    del buf
    shm.close()


def _echo_zmq(ready, addr):
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.connect(addr)
    ready.put("zmq")
    while True:
        f = sock.recv(copy=False)
        if f.bytes[:1] == b"S" and len(f) == 1:
            sock.send(b"\0")
            break
        a = np.frombuffer(f.buffer, np.uint8)
        s = int(a.sum()) if a.size else 0
        sock.send(s.to_bytes(8, "little"))
    sock.close(linger=0)
    ctx.term()


def _iox_services(prefix):
    import iceoryx2 as iox

    iox.set_log_level(iox.LogLevel.Error)
    node = iox.NodeBuilder.new().create(iox.ServiceType.Ipc)

    def svc(name):
        return (
            node.service_builder(iox.ServiceName.new(f"{prefix}/{name}"))
            .publish_subscribe(iox.Slice[ctypes.c_uint8])
            .subscriber_max_buffer_size(2)
            .history_size(0)
            .open_or_create()
        )

    return node, svc("ping"), svc("pong")


def _iox_view(sample, n):
    if n == 0:
        return np.empty(0, np.uint8)
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(sample.payload_ptr))


def _echo_iceoryx2(ready, prefix):
    node, ping, pong = _iox_services(prefix)
    sub = ping.subscriber_builder().create()
    pub = pong.publisher_builder().initial_max_slice_len(8).create()
    ready.put("iceoryx2")
    while True:
        sample = _poll(sub.receive)
        n = sample.payload().len()
        a = _iox_view(sample, n)
        s = int(a.sum()) if n else 0
        del a
        stop = n == 3  # the stop message: 3 bytes
        sample.delete()
        out = pub.loan_slice_uninit(8)
        _iox_view(out, 8)[:] = np.frombuffer(s.to_bytes(8, "little"), np.uint8)
        out.assume_init().send()
        if stop:
            break
    del sub, pub, ping, pong, node


# --- the sending sides (this process) ---------------------------------------


class _Tensorbus:
    def __init__(self, ctx, ready):
        import tensorbus as tb

        self.dir = tempfile.TemporaryDirectory(prefix="tb-bench-")
        self.broker = tb.Broker(TB_CONFIG, os.path.join(self.dir.name, "broker.sock"))
        self.client = tb.Client(self.broker.socket, name="bench")
        self.prod = self.client.producer("bench/ping")
        self.cons = self.client.consumer("bench/pong", depth=4, policy="block", wait_strategy="busy")
        self.proc = ctx.Process(target=_echo_tensorbus, args=(ready, str(self.broker.socket)))

    def rtt(self, n, v):
        with self.prod.loan((n,), "uint8") as t:
            if n:
                np.asarray(t)[:] = v
            t.publish()
        with self.cons.recv() as r:
            return int(np.asarray(r)[0])

    def close(self):
        with self.prod.loan((0,), "uint8") as t:
            t.publish(user_header=b"S")
        self.cons.recv(timeout=10).release()
        self.proc.join(10)
        self.client.close()
        self.broker.close()
        self.dir.cleanup()


class _Queue:
    def __init__(self, ctx, ready):
        self.inq, self.outq = ctx.Queue(), ctx.Queue()
        self.bufs = {n: np.empty(n, np.uint8) for n in SIZES}
        self.proc = ctx.Process(target=_echo_queue, args=(ready, self.inq, self.outq))

    def rtt(self, n, v):
        a = self.bufs[n]
        a[:] = v
        self.inq.put(a)
        return self.outq.get()

    def close(self):
        self.inq.put(None)
        self.outq.get(timeout=10)
        self.proc.join(10)


class _Shm:
    def __init__(self, ctx, ready):
        from multiprocessing import shared_memory

        self.shm = shared_memory.SharedMemory(create=True, size=16 * MiB)
        self.buf = np.ndarray((16 * MiB,), np.uint8, self.shm.buf)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_echo_shm, args=(ready, child, self.shm.name))

    def rtt(self, n, v):
        self.buf[:n] = v
        self.conn.send_bytes(n.to_bytes(8, "little", signed=True))
        return int.from_bytes(self.conn.recv_bytes(), "little")

    def close(self):
        self.conn.send_bytes(STOP.to_bytes(8, "little", signed=True))
        self.conn.recv_bytes()
        self.proc.join(10)
        del self.buf
        self.shm.close()
        self.shm.unlink()


class _Zmq:
    def __init__(self, ctx, ready):
        import zmq

        self.dir = tempfile.TemporaryDirectory(prefix="tb-bench-zmq-")
        addr = "ipc://" + os.path.join(self.dir.name, "s")
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PAIR)
        self.sock.bind(addr)
        # A fresh array per send: with copy=False zmq owns the buffer until sent.
        self.proc = ctx.Process(target=_echo_zmq, args=(ready, addr))

    def rtt(self, n, v):
        a = np.empty(n, np.uint8)
        a[:] = v
        self.sock.send(a, copy=False)  # type: ignore[call-overload]  # ndarray is a Buffer
        return int.from_bytes(self.sock.recv(), "little")

    def close(self):
        self.sock.send(b"S")
        self.sock.recv()
        self.proc.join(10)
        self.sock.close(linger=0)
        self.ctx.term()
        self.dir.cleanup()


class _Iceoryx2:
    def __init__(self, ctx, ready):
        self.prefix = f"tensorbus-bench-{os.getpid()}"
        self.node, ping, pong = _iox_services(self.prefix)
        self.services = (ping, pong)
        self.pub = (
            ping.publisher_builder()
            .initial_max_slice_len(16 * MiB)
            .max_loaned_samples(1)
            .create()
        )
        self.sub = pong.subscriber_builder().create()
        self.proc = ctx.Process(target=_echo_iceoryx2, args=(ready, self.prefix))

    def _send(self, n, v):
        s = self.pub.loan_slice_uninit(n)
        if n:
            _iox_view(s, n)[:] = v
        s.assume_init().send()

    def _ack(self):
        r = _poll(self.sub.receive)
        v = int.from_bytes(bytes(_iox_view(r, 8)), "little")
        r.delete()
        return v

    def rtt(self, n, v):
        if n == 3:
            n = 4  # 3 bytes is the stop message
        self._send(n, v)
        return self._ack()

    def close(self):
        self._send(3, 0)
        self._ack()
        self.proc.join(10)
        del self.pub, self.sub, self.services, self.node


def _available(name):
    mod = {"zmq": "zmq", "iceoryx2": "iceoryx2"}.get(name)
    if mod is None:
        return None
    try:
        __import__(mod)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"not available ({type(e).__name__}: {e})"
    return None


CLASSES = {
    "tensorbus": _Tensorbus,
    "mp.Queue": _Queue,
    "shm+Pipe": _Shm,
    "zmq": _Zmq,
    "iceoryx2": _Iceoryx2,
}


def _inprocess(n, iters):
    a = np.empty(n, np.uint8)
    out = []
    for i in range(iters):
        t0 = time.perf_counter_ns()
        a[:] = i & 255
        s = int(a.sum())
        out.append(time.perf_counter_ns() - t0)
        assert s == n * (i & 255)
    return out


def _pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def run(rounds, iters, warmup, sizes=SIZES, transports=TRANSPORTS):
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    status: Dict[str, str] = {}
    live: Dict[str, Any] = {}
    for name in transports:
        why = _available(name)
        if why:
            status[name] = why
            continue
        try:
            live[name] = CLASSES[name](ctx, ready)
            live[name].proc.start()
            status[name] = "ok"
        except Exception as e:  # noqa: BLE001 - reported in the table
            status[name] = f"failed ({type(e).__name__}: {e})"
    for _ in live:
        ready.get(timeout=60)
    samples: Dict[Tuple[str, int], List[int]] = {(t, n): [] for t in live for n in sizes}
    try:
        for r in range(rounds):
            for name, tr in live.items():
                for n in sizes:
                    it = iters[n]
                    for i in range(warmup + it):
                        v = (r * 7 + i) & 255
                        t0 = time.perf_counter_ns()
                        got = tr.rtt(n, v)
                        dt = time.perf_counter_ns() - t0
                        want = n * v if n != 3 else 4 * v
                        if got != want:
                            raise RuntimeError(f"{name}: checksum {got} != {want} (size {n})")
                        if i >= warmup:
                            samples[(name, n)].append(dt)
    finally:
        for tr in live.values():
            try:
                tr.close()
            except Exception:  # noqa: BLE001
                tr.proc.kill()
    inproc = {n: _inprocess(n, rounds * iters[n]) for n in sizes if n}
    results = []
    for name in transports:
        row = {"transport": name, "status": status[name]}
        for n in sizes:
            xs = samples.get((name, n))
            if xs:
                row[str(n)] = {"p50_us": _pct(xs, 50) / 1e3, "p99_us": _pct(xs, 99) / 1e3, "n": len(xs)}
        results.append(row)
    return {
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": _cpu_model(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "rounds": rounds,
        "iters": {str(n): iters[n] for n in sizes},
        "sizes": list(sizes),
        "results": results,
        "inprocess": {str(n): {"p50_us": _pct(v, 50) / 1e3, "p99_us": _pct(v, 99) / 1e3} for n, v in inproc.items()},
        "ratios": _ratios(results, inproc),
    }


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ratios(results, inproc):
    by = {r["transport"]: r for r in results}
    out = {}
    tbr, iox = by.get("tensorbus", {}), by.get("iceoryx2", {})
    if "0" in tbr and "0" in iox:
        out["tensorbus_empty_rtt_p50 / iceoryx2_empty_rtt_p50"] = tbr["0"]["p50_us"] / iox["0"]["p50_us"]
    else:
        out["tensorbus_empty_rtt_p50 / iceoryx2_empty_rtt_p50"] = None
    big = str(16 * MiB)
    if big in tbr and (16 * MiB) in inproc:
        out["tensorbus_16MiB_rtt_p50 / inprocess_16MiB_write_read_p50"] = tbr[big]["p50_us"] / (
            _pct(inproc[16 * MiB], 50) / 1e3
        )
    return out


def python_work(n=20000, repeats=5):
    """ns of Python-side work per empty round trip, both sides in one process.

    The very calls of the tensorbus sender and echo above, on channels whose
    tensor is always already queued: no waiting and no second process, so
    the number is the CPU cost of the bindings and numpy per message (best
    of ``repeats`` runs of ``n``), unaffected by scheduling on a busy machine.
    """
    import tensorbus as tb

    with tempfile.TemporaryDirectory(prefix="tb-bench-work-") as d:
        with tb.Broker(TB_CONFIG, os.path.join(d, "broker.sock")) as broker:
            c = tb.Client(broker.socket, name="bench-work")
            ping, pong = c.producer("bench/ping"), c.producer("bench/pong")
            cping = c.consumer("bench/ping", depth=4, policy="block", wait_strategy="busy")
            cpong = c.consumer("bench/pong", depth=4, policy="block", wait_strategy="busy")

            def once():
                with ping.loan((0,), "uint8") as t:  # sender
                    t.publish()
                with cping.recv() as t:  # echo
                    a = np.asarray(t)
                    s = int(a.sum()) if a.size else 0
                    stop = t.user_header[:1] == b"S"
                    del a
                with pong.loan(1, "int64") as r:
                    np.asarray(r)[0] = s
                    r.publish()
                with cpong.recv() as r:  # sender
                    return int(np.asarray(r)[0]) + stop

            for _ in range(1000):
                once()
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter_ns()
                for _ in range(n):
                    once()
                best = min(best, (time.perf_counter_ns() - t0) / n)
            c.close()
    return best


def _label(n):
    return "empty" if n == 0 else f"{n // MiB} MiB"


def markdown(res):
    sizes = res["sizes"]
    head = "| transport | " + " | ".join(f"{_label(n)} RTT p50 / p99 (µs)" for n in sizes) + " |"
    lines = [head, "|---" * (len(sizes) + 1) + "|"]
    for r in res["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['transport']} | " + " | ".join([r["status"]] + [""] * (len(sizes) - 1)) + " |")
            continue
        cells = [f"{r[str(n)]['p50_us']:.1f} / {r[str(n)]['p99_us']:.1f}" for n in sizes]
        lines.append(f"| {r['transport']} | " + " | ".join(cells) + " |")
    cells = ["—"] + [
        f"{res['inprocess'][str(n)]['p50_us']:.1f} / {res['inprocess'][str(n)]['p99_us']:.1f}" for n in sizes if n
    ]
    lines.append("| in-process write+read | " + " | ".join(cells) + " |")
    lines.append("")
    for k, v in res["ratios"].items():
        lines.append(f"* {k}: " + ("n/a" if v is None else f"{v:.2f}"))
    m = res["machine"]
    lines.append(
        f"* machine: {m['nproc']} CPUs, {m['cpu']}, Python {m['python']}, numpy {m['numpy']}; "
        f"{res['rounds']} alternating rounds, iterations per round {res['iters']}"
    )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tensorbus.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few iterations (CI: completeness, not numbers)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--only", nargs="*", choices=TRANSPORTS, help="a subset of the transports")
    ap.add_argument(
        "--work",
        action="store_true",
        help="only the Python-side work per empty round trip of tensorbus, in one process (ns)",
    )
    args = ap.parse_args(argv)
    if args.work:
        n = 2000 if args.quick else 20000
        print(f"tensorbus Python-side work per empty round trip (one process, best of 5 x {n}): {python_work(n) / 1e3:.2f} us")
        return 0
    if args.quick:
        rounds, iters, warmup = args.rounds or 1, {0: 5, MiB: 3, 16 * MiB: 2}, 1
    else:
        rounds, iters, warmup = args.rounds or 5, {0: 2000, MiB: 100, 16 * MiB: 10}, 3
    res = run(rounds, iters, warmup, transports=tuple(args.only or TRANSPORTS))
    print(markdown(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
