"""In-process API: zero copy, metadata, errors, policies, iteration, stages."""

import os
import threading
import time

import numpy as np
import pytest

import tensorbus as tb
from conftest import free_slots

DTYPES = [
    ("bool", np.bool_),
    ("uint8", np.uint8),
    ("int8", np.int8),
    ("uint16", np.uint16),
    ("int16", np.int16),
    ("uint32", np.uint32),
    ("int32", np.int32),
    ("uint64", np.uint64),
    ("int64", np.int64),
    ("float16", np.float16),
    ("bfloat16", np.uint16),  # raw 2-byte type
    ("float32", np.float32),
    ("float64", np.float64),
]


def test_dtypes_constant():
    assert tb.DTYPES == tuple(name for name, _ in DTYPES)


def test_zero_copy_loan_and_receive(client):
    prod = client.producer("bcast")
    cons = client.consumer("bcast")
    with prod.loan((480, 64, 2), "uint8") as t:
        a = np.asarray(t)
        assert a.flags.writeable and a.flags.c_contiguous
        assert a.ctypes.data == t.address  # the slot itself, no copy
        assert a.shape == (480, 64, 2) and a.dtype == np.uint8
        a[:] = 7
        a[1, 2, 1] = 42
        t.publish()
    with cons.recv(timeout=1.0) as r:
        x = np.asarray(r)
        assert x.ctypes.data == r.address
        assert not x.flags.writeable
        assert x[1, 2, 1] == 42 and int(x.sum()) == 7 * x.size + 35
        with pytest.raises(ValueError):
            x[0, 0, 0] = 1
        with pytest.raises(ValueError):
            x.flags.writeable = True
        del x


def test_producer_writes_after_loan_are_what_consumer_reads(client):
    prod = client.producer("bcast")
    cons = client.consumer("bcast")
    t = prod.loan(1000, "float32")
    a = np.asarray(t)
    a[:] = np.arange(1000, dtype=np.float32)
    del a
    t.publish()
    r = cons.recv(timeout=1.0)
    assert np.array_equal(np.asarray(r), np.arange(1000, dtype=np.float32))
    r.release()


@pytest.mark.parametrize("name,npdt", DTYPES)
def test_metadata_round_trip_every_dtype(client, name, npdt):
    prod = client.producer("bcast")
    cons = client.consumer("bcast")
    with prod.loan((2, 3, 4), name) as t:
        assert t.dtype == name and t.kind == "loan" and t.writable
        a = np.asarray(t)
        assert a.dtype == np.dtype(npdt)
        a[...] = np.arange(24).reshape(2, 3, 4).astype(npdt)
        del a
        t.publish(user_header=b"hdr-" + name.encode())
    with cons.recv(timeout=1.0) as r:
        assert r.dtype == name and r.kind == "received" and not r.writable
        assert r.shape == (2, 3, 4) and r.ndim == 3
        size = np.dtype(npdt).itemsize
        assert r.itemsize == size and r.nbytes == 24 * size
        assert r.strides == (12 * size, 4 * size, size)
        assert r.user_header == b"hdr-" + name.encode()
        assert r.producer == client.id
        assert r.timestamp_ns > 0
        assert np.array_equal(np.asarray(r), np.arange(24).reshape(2, 3, 4).astype(npdt))


def test_seq_and_timestamps_increase(client):
    prod = client.producer("bcast")
    cons = client.consumer("bcast", depth=8)
    for _ in range(3):
        with prod.loan(4) as t:
            t.publish()
    got = [cons.recv(timeout=1.0) for _ in range(3)]
    assert [t.seq for t in got] == [0, 1, 2]
    ts = [t.timestamp_ns for t in got]
    assert ts == sorted(ts)
    for t in got:
        t.release()


def test_dtype_spellings(client):
    prod = client.producer("bcast")
    for spelling in ("float32", "f32", np.float32, np.dtype("float32")):
        with prod.loan(2, spelling) as t:
            assert t.dtype == "float32"
    with pytest.raises(tb.ShapeError):
        prod.loan(2, "complex64")


def test_shape_extents_are_u32(client):
    """Extents are 32-bit: negative or too large ints are a ShapeError (a
    ValueError) that says which axis and which bound, before anything is
    loaned; ints, numpy integers, tuples and lists are accepted."""
    prod = client.producer("bcast")
    for shape in (3, np.int64(3), (3,), [3], (1, 3), [np.uint8(1), 3]):
        with prod.loan(shape, "uint8") as t:
            assert t.nbytes == 3
    for shape, axis, word in (
        (-1, 0, "negative"),
        ((2, -3), 1, "negative"),
        ([4, 1 << 32], 1, "exceeds the per-axis limit of 4294967295"),
        (1 << 70, 0, "exceeds the per-axis limit"),
    ):
        with pytest.raises(tb.ShapeError, match=word) as e:
            prod.loan(shape, "uint8")
        assert isinstance(e.value, ValueError) and f"axis {axis}" in str(e.value)
    for shape in ((4, "x"), "abc", 2.5, None):
        with pytest.raises(tb.ShapeError, match="shape must be"):
            prod.loan(shape, "uint8")
    assert free_slots(client) == 16


def test_errors_are_tensorbus_errors(client, broker, tmp_path):
    with pytest.raises(tb.BrokerUnavailable) as e:
        tb.Client(str(tmp_path / "nobody.sock"))
    assert isinstance(e.value, tb.TensorbusError) and isinstance(e.value, ConnectionError)
    with pytest.raises(tb.ChannelNotFound) as e:
        client.producer("no/such")
    assert "bcast" in str(e.value)  # lists the known channels
    cons = client.consumer("bcast")
    with pytest.raises(tb.Timeout) as e:
        cons.recv(timeout=0.05)
    assert isinstance(e.value, TimeoutError)
    prod = client.producer("bcast")
    with pytest.raises(tb.ShapeError):
        prod.loan((1,) * 9, "uint8")
    with pytest.raises(tb.TooLarge):
        prod.loan(1 << 20, "uint8")
    with pytest.raises(tb.InvalidArgument):
        client.consumer("bcast", policy="sometimes")
    # a pool of two slots: hold both, the third loan fails at once
    tiny = client.producer("tiny")
    held = client.consumer("tiny", depth=4)
    for _ in range(2):
        with tiny.loan(16) as t:
            t.publish()
    with pytest.raises(tb.PoolExhausted):
        tiny.loan(16)
    with pytest.raises(tb.Timeout):
        tiny.loan(16, timeout=0.05)
    for _ in range(2):
        held.recv(timeout=1.0).release()
    with tiny.loan(16) as t:
        pass
    for cls in (tb.PoolExhausted, tb.Timeout, tb.ShapeError, tb.ChannelNotFound, tb.BrokerUnavailable):
        assert issubclass(cls, tb.TensorbusError)


def test_try_recv_and_iteration(client):
    prod = client.producer("bcast")
    cons = client.consumer("bcast", depth=8)
    assert cons.try_recv() is None
    for i in range(3):
        with prod.loan(1, "uint8") as t:
            np.asarray(t)[0] = i
            t.publish()
    seen = []
    for t in cons:
        with t:
            seen.append(int(np.asarray(t)[0]))
        if len(seen) == 3:
            break
    assert seen == [0, 1, 2]
    cons.close()
    assert list(cons) == []  # a closed consumer ends iteration


@pytest.mark.parametrize(
    "policy,depth,expect",
    [
        ("drop_oldest", 2, [3, 4]),
        ("drop_newest", 2, [0, 1]),
        ("latest", None, [4]),
    ],
)
def test_lossy_policies(client, policy, depth, expect):
    prod = client.producer("bcast")
    kw = {} if depth is None else {"depth": depth}
    cons = client.consumer("bcast", policy=policy, **kw)
    assert cons.policy == policy
    for _ in range(5):
        with prod.loan(1) as t:
            t.publish()
    got = []
    while (t := cons.try_recv()) is not None:
        got.append(t.seq)
        t.release()
    assert got == expect
    # Everything published is either received or counted as dropped.
    assert (cons.received, cons.dropped) == (len(expect), 5 - len(expect))
    stat = client.stat()
    [sub] = [s for c in stat["channels"] if c["name"] == "bcast" for s in c["subscribers"]]
    assert sub["dropped"] == cons.dropped
    assert free_slots(client) == 16
    # issue 14.3: after close() the counters keep their final values.
    final = (cons.received, cons.dropped)
    cons.close()
    assert cons.closed
    assert (cons.received, cons.dropped) == final
    with pytest.raises(tb.Closed):
        cons.recv(timeout=0.05)


def test_counters_after_close_keep_their_final_values(broker):
    """issue 14.3: `dropped` and `received` after close() of the consumer
    or of its client are the values as of the close, also when the
    subscription record has since gone to another subscriber."""
    with tb.Client(broker.socket) as c:
        prod = c.producer("bcast")
        cons = c.consumer("bcast", policy="drop_oldest", depth=2)
        for _ in range(5):
            with prod.loan(1) as t:
                t.publish()
        kept = cons.recv(timeout=1.0)  # alive across the close
        assert (cons.received, cons.dropped) == (1, 3)
        cons.close()
        assert (cons.received, cons.dropped) == (1, 3)
        kept.release()
        # Its record is free: a new subscriber may take it; the closed
        # consumer's counts stay its own.
        other = c.consumer("bcast", policy="drop_oldest", depth=2)
        for _ in range(4):
            with prod.loan(1) as t:
                t.publish()
        assert other.dropped == 2
        assert (cons.received, cons.dropped) == (1, 3)
        # Closed through the client.
        with other.recv(timeout=1.0):
            pass
    assert other.closed
    assert (other.received, other.dropped) == (1, 2)


def test_workqueue_in_process(client):
    prod = client.producer("work")
    w1 = client.consumer("work", depth=8)
    w2 = client.consumer("work", depth=8)
    for _ in range(6):
        with prod.loan(1) as t:
            t.publish()
    seqs = []
    for w in (w1, w2):
        while (t := w.try_recv()) is not None:
            seqs.append(t.seq)
            t.release()
    assert sorted(seqs) == list(range(6))


def test_stage_in_place_and_forward(client):
    prod = client.producer("stage/in")
    stage = client.stage("stage/in", "stage/out")
    out = client.consumer("stage/out")
    with prod.loan(8, "float32") as t:
        np.asarray(t)[:] = np.arange(8, dtype=np.float32)
        t.publish(user_header=b"frame-1")
    with stage.recv_mut(timeout=1.0) as s:
        assert s.kind == "staged" and s.writable
        slot = s.slot
        a = np.asarray(s)
        assert a.flags.writeable
        a *= 2
        del a
        with pytest.raises(tb.ChannelNotFound):
            s.forward("somewhere/else")  # the tensor stays staged
        assert not s.released
        assert s.forward("stage/out") == 1
    with out.recv(timeout=1.0) as r:
        assert r.slot == slot  # the very same slot, forwarded
        assert np.array_equal(np.asarray(r), 2 * np.arange(8, dtype=np.float32))
        assert r.user_header == b"frame-1"
    with pytest.raises(tb.Timeout):
        stage.recv_mut(timeout=0.05)


def test_gil_released_while_waiting(client):
    cons = client.consumer("bcast")
    done = threading.Event()

    def waiter():
        with pytest.raises(tb.Timeout):
            cons.recv(timeout=0.5)
        done.set()

    th = threading.Thread(target=waiter)
    th.start()
    n = 0
    start = time.monotonic()
    while not done.is_set() and time.monotonic() - start < 5:
        n += 1
    th.join()
    assert n > 10000  # this thread ran while the other one waited


def test_embedded_broker_and_default_socket(tmp_path, monkeypatch):
    sock = str(tmp_path / "b.sock")
    monkeypatch.setenv("TENSORBUS_SOCKET", sock)
    assert str(tb.socket_path()) == sock
    with tb.Broker() as b:  # default config, default socket
        assert str(b.socket) == sock and b.running
        with tb.Client() as c:
            assert c.id > 0 or c.id == 0
    assert not b.running
    assert not os.path.exists(sock)


def test_broker_takes_toml_text_or_a_path(tmp_path):
    """issue 14.3: tb.Broker(config) takes TOML text or the path of a TOML
    file (str or os.PathLike); anything else gets a clear error."""
    toml = '[[pools]]\nname = "p"\nslot_size = 4096\nslots = 2\n[[channels]]\nname = "from/file"\n'
    path = tmp_path / "broker.toml"
    path.write_text(toml)

    def channels(b):
        with tb.Client(b.socket) as c:
            return [ch["name"] for ch in c.stat()["channels"]]

    one_line = 'pools = [{name = "p", slot_size = 4096, slots = 2}]'  # text without a newline
    for config in (str(path), path, toml, one_line):
        sock = str(tmp_path / "b.sock")
        with tb.Broker(config, sock) as b:
            assert channels(b) == ([] if config is one_line else ["from/file"]), config
    with tb.Broker(config_file=path, socket=str(tmp_path / "c.sock")) as b:
        assert channels(b) == ["from/file"]
    # A path that names no file is not taken for TOML text.
    with pytest.raises(ValueError, match="expected TOML text or a path to a TOML file") as e:
        tb.Broker(str(tmp_path / "missing.toml"), str(tmp_path / "e.sock"))
    assert "missing.toml" in str(e.value)
    with pytest.raises(tb.InvalidArgument, match="cannot read config"):
        tb.Broker(tmp_path / "missing.toml", str(tmp_path / "e.sock"))
    with pytest.raises(TypeError, match="expected TOML text or a path to a TOML file"):
        tb.Broker(42, str(tmp_path / "e.sock"))  # type: ignore[arg-type]
    # A file with a mistake: the error names the file and the field.
    bad = tmp_path / "bad.toml"
    bad.write_text('[[pools]]\nname = "p"\nslot_size = "lots"\nslots = 2\n')
    with pytest.raises(tb.InvalidArgument, match="bad.toml") as e:
        tb.Broker(bad, str(tmp_path / "e.sock"))
    assert "slot_size" in str(e.value)
    with pytest.raises(ValueError, match="not both"):
        tb.Broker(toml, config_file=path)


def test_memoryview_is_refused_and_numpy_is_the_way(client):
    """abi3-py39 has no buffer protocol (the limited API has it from 3.11):
    memoryview(t) raises TypeError; memoryview(np.asarray(t)) is zero-copy."""
    prod = client.producer("bcast")
    cons = client.consumer("bcast")
    with prod.loan((2, 3), "uint8") as t:
        with pytest.raises(TypeError):
            memoryview(t)
        m = memoryview(np.asarray(t))
        assert not m.readonly and m.shape == (2, 3)
        m[1, 2] = 9
        m.release()
        t.publish()
    with cons.recv(timeout=1.0) as r:
        with pytest.raises(TypeError):
            memoryview(r)
        m = memoryview(np.asarray(r))
        assert m.readonly and m[1, 2] == 9 and r.exports == 1
        m.release()
    assert r.released
