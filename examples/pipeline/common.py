"""What the pipeline's processes agree on: channel names, the broker
configuration, the user header that carries a frame's identity downstream,
the clock, command-line arguments of the roles, and per-frame timing records.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import struct
import time

RAW = "camera/raw"
"""Camera frames, ``(H, W, 3)`` uint8 RGB."""
INPUT = "model/input"
"""Model inputs, ``(1, 3, h, w)`` float32 BGR, normalised."""
PROB = "model/prob"
"""The detector's probability maps, ``(1, 1, h, w)`` float32 (ORT writes them into the loan)."""
DETECTIONS = "detections"
"""Boxes in camera pixels, ``(K, 5)`` float32 rows ``x0, y0, x1, y1, score``."""

DEPTH = 4
"""Ring depth of every subscription; every channel is lossless (``block``)."""
FIRST_WAIT_S = 120.0
"""How long a role waits for its first tensor (the camera starts last)."""
NEXT_WAIT_S = 10.0
"""How long a role waits for each later tensor before it gives up on the stream."""

FRAME_HEADER = struct.Struct("<IQ")
"""User header of every tensor: frame index, camera publish time (CLOCK_MONOTONIC ns; 0 on camera/raw)."""


def now_ns() -> int:
    """CLOCK_MONOTONIC in nanoseconds: the clock tensorbus stamps ``timestamp_ns`` with at publish."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def parse_size(text: str) -> tuple[int, int]:
    """``"352x640"`` → ``(352, 640)`` (height x width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return h, w


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def broker_config(frame: tuple[int, int], model_input: tuple[int, int], slots: int = 6) -> str:
    """The embedded broker's TOML: one pool per kind of tensor, sized for
    ``frame`` (camera) and ``model_input`` (h, w), and four lossless
    broadcast channels."""
    (fh, fw), (mh, mw) = frame, model_input
    mib = 1 << 20
    pools = {
        "frames": _round_up(fh * fw * 3, mib),
        "inputs": _round_up(3 * mh * mw * 4, mib),
        "probs": _round_up(mh * mw * 4, mib),
        "boxes": 64 * 1024,
    }
    text = [f'[[pools]]\nname = "{name}"\nslot_size = {size}\nslots = {slots}\n' for name, size in pools.items()]
    for channel, pool in ((RAW, "frames"), (INPUT, "inputs"), (PROB, "probs"), (DETECTIONS, "boxes")):
        text.append(
            f'[[channels]]\nname = "{channel}"\npools = ["{pool}"]\nmode = "broadcast"\n'
            f'policy = "block"\ndepth = {DEPTH}\n'
        )
    return "\n".join(text)


def role_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every role takes (the launcher passes them all)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--socket", required=True, help="broker socket")
    p.add_argument("--run-dir", required=True, help="where to put the ready marker and the timing record")
    p.add_argument("--frames", type=int, required=True, help="frames in the run")
    p.add_argument("--frame-size", type=parse_size, default=(720, 1280), help="camera HEIGHTxWIDTH")
    p.add_argument("--input-size", type=parse_size, default=(352, 640), help="model input HEIGHTxWIDTH")
    p.add_argument("--quiet", action="store_true", help="no per-frame output")
    return p


def die_with_parent() -> None:
    """Asks Linux to SIGKILL this process when the launcher dies (prctl PR_SET_PDEATHSIG),
    and leaves Ctrl-C to the launcher, which stops the roles with SIGTERM (no traceback from each)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def connect(args: argparse.Namespace, role: str) -> "tb.Client":
    """A client of the launcher's broker, named after the role."""
    import tensorbus as tb

    die_with_parent()
    return tb.Client(args.socket, name=role)


def mark_ready(args: argparse.Namespace, role: str) -> None:
    """Tells the launcher this role has subscribed and warmed up."""
    with open(os.path.join(args.run_dir, f"{role}.ready"), "w"):
        pass


class Laps:
    """Per-frame stopwatch of one role: ``mark(name)`` charges the wall time
    (CLOCK_MONOTONIC) and the CPU time of this process (all its threads)
    since the previous mark to ``name``. CPU time is what a step costs the
    machine; wall time also holds the time this process was preempted, which
    on two cores shared by four processes can be most of it (a publish that
    wakes a consumer often hands the core to it before returning)."""

    def __init__(self) -> None:
        self.wall: dict[str, int] = {}
        self.cpu: dict[str, int] = {}
        self.restart()

    def restart(self) -> None:
        """Starts a new frame: forgets the marks, restarts the stopwatch."""
        self.wall.clear()
        self.cpu.clear()
        self._wall, self._cpu = now_ns(), time.process_time_ns()

    def mark(self, name: str, wall_ns: int | None = None) -> None:
        """Charges the time since the previous mark to ``name`` (``wall_ns`` overrides the wall part)."""
        wall, cpu = now_ns(), time.process_time_ns()
        self.wall[name] = self.wall.get(name, 0) + (wall - self._wall if wall_ns is None else wall_ns)
        self.cpu[name] = self.cpu.get(name, 0) + cpu - self._cpu
        self._wall, self._cpu = wall, cpu

    def columns(self) -> dict[str, float]:
        """``{name: wall µs, name + "_cpu": CPU µs}`` for ``Record.add``."""
        out = {}
        for name, wall in self.wall.items():
            out[name] = us(wall)
            out[name + "_cpu"] = us(self.cpu[name])
        return out


def receive(consumer: "tb.Consumer", timeout: float, laps: Laps) -> "tb.Tensor":
    """The next tensor, charged to ``laps`` as ``recv``. The wait for the
    producer is not IPC and is not charged: if a tensor was already queued,
    the wall time is that of the non-blocking receive; if the consumer had to
    wait, it is the delivery latency from the producer's publish (or from
    this call, whichever is later) to this process running with the tensor
    in hand (the futex wake-up a waiting consumer pays). The CPU time is all
    the CPU the receive used, its 50 µs of spinning before it sleeps included."""
    laps.restart()
    start = now_ns()
    t = consumer.try_recv()
    if t is None:
        t = consumer.recv(timeout=timeout)
        laps.mark("recv", wall_ns=now_ns() - max(start, t.timestamp_ns))
    else:
        laps.mark("recv")
    return t


class Record:
    """Per-frame timings of one role (microseconds), saved as JSON for the launcher."""

    def __init__(self, role: str):
        self.role = role
        self.columns: dict[str, list] = {}

    def add(self, **fields: float) -> None:
        """One frame's values, e.g. ``add(frame=3, loan=12.5, publish=4.0)``."""
        for key, value in fields.items():
            self.columns.setdefault(key, []).append(value)

    def save(self, run_dir: str, **extra) -> None:
        """Writes ``<run_dir>/<role>.json``: the columns plus ``extra`` scalars."""
        path = os.path.join(run_dir, f"{self.role}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"role": self.role, "columns": self.columns, **extra}, f)
        os.replace(path + ".tmp", path)


def us(ns: int) -> float:
    """Nanoseconds → microseconds, rounded to 0.1."""
    return round(ns / 1000.0, 1)
