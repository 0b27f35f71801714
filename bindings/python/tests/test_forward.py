"""Stage.forward(to): the stage's output, another channel by name, or a
Producer object; seq and timestamp_ns after publish() and forward()."""

import time

import numpy as np
import pytest

import tensorbus as tb
from conftest import free_slots, total_slots


def stage_one(client, value=1.0):
    prod = client.producer("stage/in")
    with prod.loan(4, "float32") as t:
        np.asarray(t)[:] = value
        t.publish()
    prod.close()


def test_forward_to_another_channel_by_name(client):
    stage = client.stage("stage/in", "stage/out")
    other = client.consumer("bcast")
    out = client.consumer("stage/out")
    for i in range(3):
        stage_one(client, i)
        with stage.recv_mut(timeout=1.0) as s:
            slot = s.slot
            np.asarray(s)[:] += 10
            assert s.forward("bcast") == 1  # a producer the stage opens and keeps
        with other.recv(timeout=1.0) as r:
            assert r.slot == slot  # the very same slot
            assert np.asarray(r).tolist() == [10.0 + i] * 4
            assert r.seq == i  # the stage's producer on "bcast" counts its own
    assert out.try_recv() is None
    assert free_slots(client) == total_slots(client)


def test_forward_to_a_producer_object(client):
    stage = client.stage("stage/in", "stage/out")
    prod = client.producer("bcast")
    other = client.consumer("bcast")
    stage_one(client, 3.0)
    with stage.recv_mut(timeout=1.0) as s:
        assert s.forward(prod) == 1
    with other.recv(timeout=1.0) as r:
        assert np.asarray(r).tolist() == [3.0] * 4
    # the producer still loans normally afterwards
    with prod.loan(2) as t:
        t.publish()
    assert other.recv(timeout=1.0).seq == 1


def test_forward_through_a_producer_with_a_loan_out(client):
    """A producer's loans do not block forwards through it (several loans
    and forwards may be in flight at once): each gets its own seq."""
    stage = client.stage("stage/in", "stage/out")
    prod = client.producer("bcast")
    other = client.consumer("bcast", depth=8)
    stage_one(client, 4.0)
    loan = prod.loan(4, "float32")
    np.asarray(loan)[:] = 8.0
    with stage.recv_mut(timeout=1.0) as s:
        assert s.forward(prod) == 1
        assert s.seq == 0
    assert not loan.released and loan.publish() == 1  # the loan went on
    assert loan.seq == 1
    with other.recv(timeout=1.0) as r:
        assert (r.seq, np.asarray(r).tolist()) == (0, [4.0] * 4)
    with other.recv(timeout=1.0) as r:
        assert (r.seq, np.asarray(r).tolist()) == (1, [8.0] * 4)
    assert free_slots(client) == total_slots(client)


def test_forward_to_a_channel_of_another_pool_is_refused_and_keeps_the_tensor(client):
    stage = client.stage("stage/in", "stage/out")
    out = client.consumer("stage/out")
    stage_one(client, 5.0)
    with stage.recv_mut(timeout=1.0) as s:
        with pytest.raises(tb.InvalidArgument, match="pool") as e:
            s.forward("tiny")  # channel "tiny" uses pool "tiny", the slot is in "small"
        assert isinstance(e.value, tb.TensorbusError)
        assert "tiny" in str(e.value) and "small" in str(e.value)
        assert not s.released and s.kind == "staged"
        assert s.forward() == 1  # the same tensor still goes where it can
    with out.recv(timeout=1.0) as r:
        assert np.asarray(r).tolist() == [5.0] * 4


def test_forward_to_a_producer_of_another_client_is_refused(broker, client):
    stage = client.stage("stage/in", "stage/out")
    with tb.Client(broker.socket) as c2:
        foreign = c2.producer("bcast")
        stage_one(client)
        with stage.recv_mut(timeout=1.0) as s:
            with pytest.raises(tb.InvalidArgument, match="same Client"):
                s.forward(foreign)
            assert not s.released
    assert free_slots(client) == total_slots(client)


def test_forward_bad_target_type_and_wrong_kind(client):
    stage = client.stage("stage/in", "stage/out")
    stage_one(client)
    with stage.recv_mut(timeout=1.0) as s:
        with pytest.raises(tb.InvalidArgument, match="channel name or a tensorbus.Producer"):
            s.forward(42)
        assert s.forward(None) == 0  # nobody subscribed to stage/out
    with client.producer("bcast").loan(1) as t:
        with pytest.raises(tb.InvalidArgument):
            t.forward("bcast")


def test_seq_and_timestamp_after_publish(client):
    prod = client.producer("bcast")
    cons = client.consumer("bcast")
    for i in range(3):
        t = prod.loan(1)
        assert t.seq == 0 and t.timestamp_ns == 0  # not stamped yet
        before = time.monotonic_ns()
        t.publish()
        assert t.seq == i
        assert before <= t.timestamp_ns <= time.monotonic_ns()
        with cons.recv(timeout=1.0) as r:
            assert (r.seq, r.timestamp_ns) == (t.seq, t.timestamp_ns)
        assert "seq=%d" % i in repr(t)


def test_seq_and_timestamp_after_forward(client):
    stage = client.stage("stage/in", "stage/out")
    out = client.consumer("stage/out")
    stage_one(client)
    s = stage.recv_mut(timeout=1.0)
    upstream = (s.seq, s.timestamp_ns)
    s.forward()
    with out.recv(timeout=1.0) as r:
        assert (s.seq, s.timestamp_ns) == (r.seq, r.timestamp_ns)
        assert s.timestamp_ns >= upstream[1]
