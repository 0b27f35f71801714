"""DLPack: versioned and legacy capsules, read-only flag, zero copy."""

import ctypes
import gc

import numpy as np
import pytest

import tensorbus as tb
from conftest import free_slots

_capsule_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_valid.restype = ctypes.c_int
_capsule_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]


def received(client, dtype="float32", value=1.5):
    prod = client.producer("bcast")
    cons = client.consumer("bcast")
    with prod.loan((4, 6), dtype) as t:
        np.asarray(t)[:] = value
        t.publish()
    return cons.recv(timeout=1.0), cons


def test_device_is_cpu(client):
    t, _ = received(client)
    assert t.__dlpack_device__() == (1, 0)
    t.release()


def test_from_dlpack_is_zero_copy_and_read_only(client):
    t, _ = received(client)
    y = np.from_dlpack(t)
    assert y.ctypes.data == t.address
    assert y.shape == (4, 6) and y.dtype == np.float32
    assert not y.flags.writeable
    assert float(y.sum()) == 1.5 * 24
    assert t.exports == 1
    with pytest.raises(BufferError):
        t.release()
    del y
    gc.collect()
    assert t.exports == 0
    t.release()
    assert free_slots(client) == 16


def test_versioned_and_legacy_capsules(client):
    t, _ = received(client)
    cap = t.__dlpack__(max_version=(1, 0))
    assert _capsule_valid(cap, b"dltensor_versioned") == 1
    legacy = t.__dlpack__()
    assert _capsule_valid(legacy, b"dltensor") == 1
    old = t.__dlpack__(max_version=(0, 8))
    assert _capsule_valid(old, b"dltensor") == 1
    assert t.exports == 3
    del cap, legacy, old  # never consumed: the capsule destructor ends the exports
    gc.collect()
    assert t.exports == 0
    t.release()


def test_loan_dlpack_is_writable(client):
    prod = client.producer("bcast")
    cons = client.consumer("bcast")
    with prod.loan(8, "int32") as t:
        y = np.from_dlpack(t)
        assert y.flags.writeable and y.ctypes.data == t.address
        y[:] = 11
        del y
        t.publish()
    with cons.recv(timeout=1.0) as r:
        assert np.asarray(r).tolist() == [11] * 8


def test_dlpack_arguments(client):
    t, _ = received(client)
    with pytest.raises(BufferError):
        t.__dlpack__(dl_device=(2, 0))
    with pytest.raises(BufferError):
        t.__dlpack__(copy=True)
    cap = t.__dlpack__(dl_device=(1, 0), copy=False, max_version=(1, 1))
    del cap
    t.release()


@pytest.mark.parametrize("dtype", ["bool", "uint8", "int16", "uint32", "int64", "float16", "float64"])
def test_from_dlpack_dtypes(client, dtype):
    t, _ = received(client, dtype, value=1)
    y = np.from_dlpack(t)
    assert y.dtype == np.dtype(dtype)
    assert np.array_equal(y, np.asarray(t))
    del y
    t.release()
