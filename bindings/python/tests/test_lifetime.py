"""No sequence of Python calls can make a view dangle or crash."""

import gc
import random

import numpy as np
import pytest

import tensorbus as tb
from conftest import free_slots


def publish(prod, n=1, value=1):
    for _ in range(n):
        with prod.loan(16, "uint8") as t:
            np.asarray(t)[:] = value
            t.publish()


def test_release_twice_is_harmless(client):
    prod = client.producer("bcast")
    cons = client.consumer("bcast")
    publish(prod)
    t = cons.recv(timeout=1.0)
    t.release()
    t.release()
    assert t.released
    with t:
        pass


def test_use_after_release_raises(client):
    prod = client.producer("bcast")
    cons = client.consumer("bcast")
    publish(prod)
    t = cons.recv(timeout=1.0)
    t.release()
    with pytest.raises(tb.Released):
        np.asarray(t)
    with pytest.raises(tb.Released):
        t.__dlpack__()
    with pytest.raises(tb.Released):
        t.slot
    assert t.shape == (16,)  # metadata stays readable
    loan = prod.loan(4)
    loan.publish()
    with pytest.raises(tb.Released):
        loan.publish()
    with pytest.raises(tb.Released):
        np.asarray(loan)
    cons.recv(timeout=1.0).release()


def test_release_with_exports_raises_buffer_error(client):
    prod = client.producer("bcast")
    cons = client.consumer("bcast")
    publish(prod)
    t = cons.recv(timeout=1.0)
    a = np.asarray(t)
    b = a[2:]  # a view of the view also holds the slot
    assert t.exports == 1
    del a
    with pytest.raises(BufferError):
        t.release()
    assert not t.released
    del b
    gc.collect()
    assert t.exports == 0
    t.release()
    assert free_slots(client) == 16


def test_array_outliving_with_keeps_slot(client):
    prod = client.producer("bcast")
    cons = client.consumer("bcast")
    publish(prod, value=9)
    with cons.recv(timeout=1.0) as t:
        x = np.asarray(t)
    assert not t.released  # the with ended, but x still views the slot
    assert free_slots(client) == 15
    assert int(x.sum()) == 9 * 16  # still the producer's bytes
    del x
    assert t.released
    assert free_slots(client) == 16


def test_loan_array_outliving_with_is_given_back_later(client):
    prod = client.producer("bcast")
    with prod.loan(16) as t:
        a = np.asarray(t)
    assert not t.released and free_slots(client) == 15  # the loan lives on under `a`
    with prod.loan(16) as t2:  # the producer loans on meanwhile: another slot
        assert t2.slot != t.slot
    a[:] = 1  # still valid memory
    del a
    assert t.released
    assert free_slots(client) == 16


def test_exception_in_with_discards_loan(client):
    prod = client.producer("bcast")
    cons = client.consumer("bcast")
    with pytest.raises(RuntimeError):
        with prod.loan(16) as t:
            raise RuntimeError("boom")
    assert t.released and cons.try_recv() is None
    assert free_slots(client) == 16


def test_several_loans_at_a_time(client):
    """A producer may have several loans out (as in Rust): each is its own
    slot, published (stamped) in the order of the publish calls."""
    prod = client.producer("bcast")
    cons = client.consumer("bcast", depth=8)
    a = prod.loan(16)
    b = prod.loan(16)
    c = prod.loan(16)
    assert len({a.slot, b.slot, c.slot}) == 3
    assert free_slots(client) == 13
    for t, v in ((a, 1), (b, 2), (c, 3)):
        np.asarray(t)[:] = v
    assert b.publish() == 1 and a.publish() == 1
    c.release()
    assert (b.seq, a.seq) == (0, 1)
    got = []
    for _ in range(2):
        with cons.recv(timeout=1.0) as r:
            got.append((r.seq, int(np.asarray(r)[0])))
    assert got == [(0, 2), (1, 1)]
    assert cons.try_recv() is None
    assert free_slots(client) == 16


def test_close_client_while_views_live(broker, client):
    c = tb.Client(broker.socket, name="closing")
    prod = c.producer("bcast")
    cons = c.consumer("bcast")
    publish(prod, value=5)
    t = cons.recv(timeout=1.0)
    x = np.asarray(t)
    y = np.from_dlpack(t)
    loan = prod.loan(16)
    la = np.asarray(loan)
    c.close()
    assert c.closed and cons.closed and prod.closed
    with pytest.raises(tb.Closed):
        c.producer("bcast")
    with pytest.raises(tb.Closed):
        cons.recv(timeout=0.01)
    # the views still work: memory stays mapped until they are gone
    assert int(x.sum()) == 5 * 16 and int(y.sum()) == 5 * 16
    la[:] = 3
    loan.publish()  # the producer closes for real after this
    del t, x, y, la, loan
    gc.collect()
    assert free_slots(client) == 16


def test_consumer_gc_before_tensor(client):
    prod = client.producer("bcast")
    cons = client.consumer("bcast")
    publish(prod, value=2)
    t = cons.recv(timeout=1.0)
    a = np.asarray(t)
    del cons
    gc.collect()
    assert int(a.sum()) == 32
    del t
    gc.collect()
    assert int(a.sum()) == 32
    del a
    gc.collect()
    assert free_slots(client) == 16


def test_random_gc_orders(broker, client):
    rng = random.Random(1234)
    for round_ in range(30):
        c = tb.Client(broker.socket, name=f"gc{round_}")
        prod = c.producer("bcast")
        cons = c.consumer("bcast", depth=8)
        objs = {"client": c, "prod": prod, "cons": cons}
        for i in range(3):
            publish(prod, value=i)
            t = cons.recv(timeout=1.0)
            objs[f"t{i}"] = t
            objs[f"a{i}"] = np.asarray(t)
            objs[f"d{i}"] = np.from_dlpack(t)
            objs[f"v{i}"] = objs[f"a{i}"][1:]
        loan = prod.loan(16)
        objs["loan"] = loan
        objs["la"] = np.asarray(loan)
        del c, prod, cons, t, loan
        keys = list(objs)
        rng.shuffle(keys)
        for k in keys:
            v = objs.pop(k)
            if k.startswith(("a", "d", "v")):
                assert v.size >= 15  # touch the memory
                int(v.sum())
            elif k == "client" and rng.random() < 0.5:
                v.close()
            elif k.startswith("t") and rng.random() < 0.5:
                try:
                    v.release()
                except BufferError:
                    pass
            del v
            if rng.random() < 0.3:
                gc.collect()
        gc.collect()
    assert free_slots(client) == 16


def test_array_struct_and_array_paths_count_exports(client):
    """np.asarray(t) goes through __array_struct__ (one capsule per array,
    kept by numpy in the array's base); __array__ through an export object.
    Both hold the slot exactly as long as the array."""
    prod = client.producer("bcast")
    t = prod.loan((4, 4), "float32")
    cap = t.__array_struct__
    assert t.exports == 1
    del cap
    assert t.exports == 0
    a = np.asarray(t)
    assert t.exports == 1 and a.ctypes.data == t.address and a.flags.writeable
    b = t.__array__()
    assert t.exports == 2 and b.ctypes.data == t.address
    c = np.asarray(t, dtype=np.float64)  # a converted copy: no export left behind
    assert t.exports == 2 and c.ctypes.data != t.address
    with pytest.raises(BufferError):
        t.release()
    v = a[1:3]  # a view of the array keeps it (and so the slot)
    del a, b
    assert t.exports == 1
    del v
    assert t.exports == 0
    t.release()
    with pytest.raises(tb.Released):
        np.asarray(t)
    with pytest.raises(tb.Released):
        t.__array_struct__
