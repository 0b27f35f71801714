"""Fixtures: an embedded broker per test (its own socket and pools) and a client."""

import os
import subprocess
import sys
import tempfile

import pytest

import tensorbus as tb

HERE = os.path.dirname(os.path.abspath(__file__))

CONFIG = """
[limits]
ring_capacity = 8

[[pools]]
name = "small"
slot_size = "64KiB"
slots = 16

[[pools]]
name = "tiny"
slot_size = 4096
slots = 2

[[channels]]
name = "bcast"
pools = ["small"]

[[channels]]
name = "work"
mode = "workqueue"
pools = ["small"]

[[channels]]
name = "tiny"
pools = ["tiny"]

[[channels]]
name = "stage/in"
mode = "workqueue"
pools = ["small"]

[[channels]]
name = "stage/out"
pools = ["small"]
"""


@pytest.fixture
def broker():
    with tempfile.TemporaryDirectory(prefix="tb-py-") as d:
        with tb.Broker(CONFIG, os.path.join(d, "broker.sock")) as b:
            yield b


@pytest.fixture
def client(broker):
    with tb.Client(broker.socket, name="pytest") as c:
        yield c


def free_slots(client, pool="small"):
    for p in client.stat()["pools"]:
        if p["name"] == pool:
            return p["slots_free"]
    raise KeyError(pool)


def total_slots(client, pool="small"):
    for p in client.stat()["pools"]:
        if p["name"] == pool:
            return p["slots_total"]
    raise KeyError(pool)


def peer(*args, **kw):
    """Starts tests/peer.py in a new Python process (no fork of the broker thread)."""
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "peer.py"), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )
