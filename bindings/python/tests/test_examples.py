"""The mirrored example programs (issue 13.8): examples/rust, examples/python
and examples/c each have a producer, a stage and a consumer of the same
frames (examples/README.md). Here they run as the user runs them, separate
processes against a real `tensorbus broker --config examples/tensorbus.toml`,
in mixed-language chains that put every program of every language in every
role: Python producer -> C stage -> Rust consumer, Rust -> Python -> C,
C -> Rust -> Python. The consumers check every value and the test checks
their output; a frame with a wrong value makes each consumer fail.

The programs are built here if needed (`cargo build --example`, `make -C
bindings/c examples`: no-ops on a built tree). The broker binary is
$TENSORBUS_CLI (bindings/python/test.sh builds it), else the newest
target/{debug,release}/tensorbus; with neither the test fails, it does not skip.
"""

import glob
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

import tensorbus as tb

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
CONFIG = os.path.join(ROOT, "examples", "tensorbus.toml")
FRAMES = 20


def broker_binary():
    path = os.environ.get("TENSORBUS_CLI")
    if path:
        assert os.access(path, os.X_OK), f"TENSORBUS_CLI={path} is not executable"
        return path
    found = [p for p in glob.glob(os.path.join(TARGET, "*", "tensorbus")) if os.access(p, os.X_OK)]
    assert found, (
        f"no tensorbus broker binary under {TARGET}/{{debug,release}}: "
        "build it (cargo build -p tensorbus-cli) or set TENSORBUS_CLI"
    )
    return max(found, key=os.path.getmtime)


@pytest.fixture(scope="module")
def programs():
    """Command prefix of each example program, by (language, role)."""
    roles = ("producer", "stage", "consumer")
    cargo = ["cargo", "build", "--quiet"] + [a for r in roles for a in ("--example", r)]
    subprocess.run(cargo, cwd=ROOT, check=True)
    subprocess.run(["make", "--quiet", "-C", "bindings/c", "examples"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    cmds = {}
    for role in roles:
        cmds["rust", role] = [os.path.join(TARGET, "debug", "examples", role)]
        cmds["c", role] = [os.path.join(TARGET, "tensorbus-c", role)]
        cmds["python", role] = [sys.executable, os.path.join(ROOT, "examples", "python", f"{role}.py")]
    for (lang, role), cmd in cmds.items():
        assert os.path.exists(cmd[-1]), f"{lang} {role}: {cmd[-1]} was not built"
    return cmds


@pytest.fixture
def broker(tmp_path):
    """A real broker process with the examples' config; yields (socket, client)."""
    sock = tmp_path / "broker.sock"
    proc = subprocess.Popen(
        [broker_binary(), "broker", "--config", CONFIG, "--socket", str(sock)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = None
    deadline = time.monotonic() + 20
    try:
        while client is None:
            if proc.poll() is not None:
                raise AssertionError(f"broker exited with {proc.returncode}: {proc.stderr.read()}")
            try:
                client = tb.Client(sock, name="test_examples")
            except tb.BrokerUnavailable:
                assert time.monotonic() < deadline, "the broker did not come up"
                time.sleep(0.05)
        yield str(sock), client
    finally:
        if client is not None:
            client.close()
        proc.kill()
        proc.wait()


class Program:
    """One example program, its output in a file (polled, so a hang cannot block the test)."""

    def __init__(self, tmp_path, name, cmd):
        self.name = name
        self.out_path = tmp_path / f"{name}.out"
        self.err_path = tmp_path / f"{name}.err"
        self.proc = subprocess.Popen(
            cmd, stdout=open(self.out_path, "w"), stderr=open(self.err_path, "w")
        )

    def output(self):
        return self.out_path.read_text() + self.err_path.read_text()

    def lines(self):
        return self.out_path.read_text().splitlines()

    def wait_line(self, prefix, timeout=20):
        deadline = time.monotonic() + timeout
        while not any(line.startswith(prefix) for line in self.lines()):
            assert self.proc.poll() is None, f"{self.name} exited {self.proc.returncode}:\n{self.output()}"
            assert time.monotonic() < deadline, f"{self.name}: no line {prefix!r}:\n{self.output()}"
            time.sleep(0.02)

    def finish(self, timeout=30):
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} did not finish in {timeout} s:\n{self.output()}")
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_chain(tmp_path, programs, sock, producer, stage, consumer):
    """producer -> frames/raw -> stage -> frames/doubled -> consumer, FRAMES frames."""
    common = ["--socket", sock, "--count", str(FRAMES)]
    started = []
    try:
        c = Program(tmp_path, f"{consumer}-consumer", programs[consumer, "consumer"] + common)
        started.append(c)
        c.wait_line("consumer: subscribed to frames/doubled")
        s = Program(tmp_path, f"{stage}-stage", programs[stage, "stage"] + common)
        started.append(s)
        s.wait_line("stage: frames/raw -> frames/doubled")
        p = Program(tmp_path, f"{producer}-producer",
                    programs[producer, "producer"] + common + ["--interval-ms", "0"])
        started.append(p)
        for prog in (p, s, c):
            assert prog.finish() == 0, f"{prog.name} failed:\n{prog.output()}"
        return p.lines(), s.lines(), c.lines()
    finally:
        for prog in started:
            prog.kill()


def row(first, step):
    """The first row of a frame as the consumers print it: 8 integers."""
    return ", ".join(str(first + step * i) for i in range(8))


def assert_all_slots_free(client):
    """Every slot of the chain's pool is free, but those a channel's history
    keeps (`history = N` in examples/tensorbus.toml: held for late subscribers)."""
    deadline = time.monotonic() + 5
    while True:
        stat = client.stat()
        pool = next(p for p in stat["pools"] if p["name"] == "small")
        # The chain's channels (frames/raw, frames/doubled) use only "small".
        kept = sum(c.get("history_held", 0) for c in stat["channels"] if c["name"].startswith("frames/"))
        if pool["slots_free"] + kept == pool["slots_total"] and pool["loaned"] == 0:
            return
        assert time.monotonic() < deadline, f"slots still held after the chain: {pool} (history keeps {kept})"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "producer,stage,consumer",
    [("python", "c", "rust"), ("rust", "python", "c"), ("c", "rust", "python")],
)
def test_mixed_language_chain(tmp_path, programs, broker, producer, stage, consumer):
    # issue 13.8: a Python producer -> C stage -> Rust consumer (and the two
    # rotations) against a real broker, every value checked.
    sock, client = broker
    plines, slines, clines = run_chain(tmp_path, programs, sock, producer, stage, consumer)

    assert plines[0] == f"producer: publishing {FRAMES} frames of 4x8 float32 on frames/raw"
    assert plines[1:-1] == [f"producer: frame {n} delivered to 1" for n in range(FRAMES)]
    assert plines[-1] == f"producer: published {FRAMES} frames"
    assert slines[0] == "stage: frames/raw -> frames/doubled"
    assert slines[1:-1] == [f"stage: frame {n} doubled, forwarded to 1" for n in range(FRAMES)]
    assert slines[-1] == f"stage: {FRAMES} frames forwarded"
    # The consumer checked all 32 values of every frame; its report shows the
    # first row, doubled once by the stage (element i of frame n: (100 n + i) * 2).
    want = [
        f"consumer: frame {n} seq {n} stages 1 row 0 [{row(2 * 100 * n, 2)}] ok" for n in range(FRAMES)
    ]
    assert clines[0] == "consumer: subscribed to frames/doubled"
    assert clines[1:-1] == want
    assert clines[-1] == f"consumer: {FRAMES} frames checked"
    assert_all_slots_free(client)


@pytest.mark.parametrize("consumer", ["rust", "python", "c"])
def test_consumer_reads_producer_directly(tmp_path, programs, broker, consumer):
    # issue 13.8: without a stage (frames/raw, stage count 0) the values are the producer's own.
    sock, client = broker
    args = ["--socket", sock, "--channel", "frames/raw", "--count", "3"]
    c = Program(tmp_path, "consumer", programs[consumer, "consumer"] + args)
    try:
        c.wait_line("consumer: subscribed to frames/raw")
        args = ["--socket", sock, "--count", "3", "--interval-ms", "0"]
        p = Program(tmp_path, "producer", programs["c", "producer"] + args)
        assert p.finish() == 0, p.output()
        assert c.finish() == 0, c.output()
    finally:
        c.kill()
    assert c.lines()[1:] == [
        f"consumer: frame {n} seq {n} stages 0 row 0 [{row(100 * n, 1)}] ok" for n in range(3)
    ] + ["consumer: 3 frames checked"]
    assert_all_slots_free(client)


@pytest.mark.parametrize("consumer", ["rust", "python", "c"])
def test_consumer_rejects_a_wrong_value(tmp_path, programs, broker, consumer):
    # issue 13.8: the consumers' checks are real: one wrong element fails them.
    sock, client = broker
    args = ["--socket", sock, "--channel", "frames/raw", "--count", "2"]
    c = Program(tmp_path, "consumer", programs[consumer, "consumer"] + args)
    try:
        c.wait_line("consumer: subscribed to frames/raw")
        producer = client.producer("frames/raw")
        for frame in range(2):
            with producer.loan((4, 8), "float32") as t:
                x = np.asarray(t)
                x[:] = (frame * 100 + np.arange(32)).reshape(4, 8)
                if frame == 1:
                    x[2, 3] += 1  # element 19 of frame 1 is 120, not 119
                del x
                t.publish(user_header=struct.pack("<QI", frame, 0))
        assert c.finish() == 1, f"the {consumer} consumer accepted a wrong value:\n{c.output()}"
    finally:
        c.kill()
    out = c.output()
    assert "consumer: frame 0 seq 0 stages 0" in out, out
    assert "consumer: frame 1 element 19: 120, want 119" in out, out
    assert "consumer: 2 frames checked" not in out, out
    producer.close()
    assert_all_slots_free(client)
