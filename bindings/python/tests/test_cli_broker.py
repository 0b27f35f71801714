"""The Python client against the real `tensorbus broker` binary (not the
embedded tb.Broker): produce and consume across processes, stat, then
SIGTERM: the broker exits 0 and removes its socket; data on open channels
keeps flowing, new handles raise BrokerUnavailable.

The binary: $TENSORBUS_CLI (bindings/python/test.sh builds it), else the
newest target/{debug,release}/tensorbus; skipped when there is none."""

import glob
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

import tensorbus as tb
from conftest import CONFIG, peer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def cli_binary():
    path = os.environ.get("TENSORBUS_CLI")
    if path:
        assert os.access(path, os.X_OK), f"TENSORBUS_CLI={path} is not executable"
        return path
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    found = [p for p in glob.glob(os.path.join(target, "*", "tensorbus")) if os.access(p, os.X_OK)]
    if not found:
        pytest.skip("no tensorbus binary (cargo build -p tensorbus-cli, or set TENSORBUS_CLI)")
    return max(found, key=os.path.getmtime)


@pytest.fixture
def cli_broker(tmp_path):
    cfg = tmp_path / "broker.toml"
    cfg.write_text(CONFIG)
    sock = tmp_path / "broker.sock"
    proc = subprocess.Popen(
        [cli_binary(), "broker", "--config", str(cfg), "--socket", str(sock)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = None
    deadline = time.monotonic() + 20
    while client is None:
        if proc.poll() is not None:
            raise AssertionError(f"broker exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            client = tb.Client(sock, name="pytest-cli")
        except tb.BrokerUnavailable:
            assert time.monotonic() < deadline, "the broker did not come up"
            time.sleep(0.05)
    try:
        yield proc, sock, client
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_python_against_the_cli_broker(cli_broker):
    proc, sock, client = cli_broker
    # another Python process consumes through the real broker
    c = peer("consume", sock, "bcast", 5)
    assert c.stdout.readline().strip() == "ready"
    cons = client.consumer("bcast", depth=8)
    prod = client.producer("bcast")
    for i in range(5):
        with prod.loan((3, 5), "float32") as t:
            np.asarray(t)[:] = i
            t.publish(user_header=b"cli")
            assert t.seq == i
    for i in range(5):
        with cons.recv(timeout=5) as r:
            assert r.seq == i and float(np.asarray(r).sum()) == 15.0 * i
    got = [json.loads(c.stdout.readline()) for _ in range(5)]
    assert [g["seq"] for g in got] == list(range(5))
    assert [g["user_header"] for g in got] == ["cli"] * 5
    assert c.wait(timeout=10) == 0, c.stderr.read()
    stat = client.stat()
    assert {p["name"] for p in stat["pools"]} == {"small", "tiny"}
    assert any(ch["name"] == "bcast" for ch in stat["channels"])

    # SIGTERM: a clean exit that removes the socket
    assert os.path.exists(sock)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0, proc.stderr.read()
    assert not os.path.exists(sock)

    # Data keeps flowing on what is open; control calls need a broker.
    with prod.loan((3, 5), "float32") as t:
        t.publish()
    with cons.recv(timeout=5) as r:
        assert r.seq == 5
    with pytest.raises(tb.BrokerUnavailable):
        client.consumer("bcast")
    with pytest.raises(tb.BrokerUnavailable):
        tb.Client(sock)
