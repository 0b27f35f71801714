"""DLPack consumers other than numpy: onnxruntime (pinned in
requirements-dev.txt) and torch (only when importable; not installed in CI)."""

import gc

import numpy as np
import pytest

import tensorbus as tb
from conftest import free_slots

ort = pytest.importorskip("onnxruntime")


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num, value):
    """One protobuf field: an int (varint) or bytes/str/nested message (length-delimited)."""
    if isinstance(value, int):
        return _varint(num << 3) + _varint(value)
    if isinstance(value, str):
        value = value.encode()
    return _varint(num << 3 | 2) + _varint(len(value)) + value


def add_model(elem_type=1):
    """ONNX ModelProto of `y = x + x` (no `onnx` package needed); elem_type 1 = float."""

    def value_info(name):
        tensor_type = _field(1, elem_type)  # TypeProto.Tensor.elem_type, any shape
        return _field(1, name) + _field(2, _field(1, tensor_type))

    node = _field(1, "x") + _field(1, "x") + _field(2, "y") + _field(4, "Add")
    graph = _field(1, node) + _field(2, "g") + _field(11, value_info("x")) + _field(12, value_info("y"))
    opset = _field(1, "") + _field(2, 13)
    return _field(1, 8) + _field(2, "tensorbus-test") + _field(7, graph) + _field(8, opset)


def received(client, shape=(4, 6), dtype="float32"):
    prod = client.producer("bcast")
    cons = client.consumer("bcast")
    src = np.arange(np.prod(shape)).reshape(shape).astype(dtype)
    with prod.loan(shape, dtype) as t:
        np.asarray(t)[...] = src
        t.publish()
    return cons.recv(timeout=1.0), src


def test_onnxruntime_from_dlpack_received_is_zero_copy(client):
    t, src = received(client)
    assert not t.writable
    ov = ort.OrtValue.from_dlpack(t)  # calls t.__dlpack__() (legacy capsule)
    assert ov.data_ptr() == t.address
    assert ov.shape() == [4, 6]
    assert ov.data_type() == "tensor(float)"
    assert t.exports == 1
    np.testing.assert_array_equal(ov.numpy(), src)
    with pytest.raises(BufferError):
        t.release()
    del ov
    gc.collect()
    assert t.exports == 0
    t.release()
    assert free_slots(client) == 16


def test_onnxruntime_from_capsule(client):
    t, src = received(client, (3, 5), "int64")
    ov = ort.OrtValue.from_dlpack(t.__dlpack__())  # a raw capsule
    assert ov.data_ptr() == t.address
    assert ov.data_type() == "tensor(int64)"
    np.testing.assert_array_equal(ov.numpy(), src)
    del ov
    gc.collect()
    assert t.exports == 0
    t.release()


def test_onnxruntime_bool(client):
    """tensorbus exports bool as kDLBool (DLPack >= 0.8); onnxruntime 1.31
    rejects that code ("Unsupported code 6") and wants uint8 plus its
    is_bool flag. The workaround is a uint8 numpy view (still zero copy)."""
    from onnxruntime.capi import _pybind_state as C

    prod = client.producer("bcast")
    values = [True, False, True, True, False, False]
    with prod.loan(6, "bool") as t:
        np.asarray(t)[:] = values
        try:
            ov = ort.OrtValue.from_dlpack(t)
        except RuntimeError as e:
            assert "Unsupported code 6" in str(e)
            ov = ort.OrtValue(C.OrtValue.from_dlpack(np.asarray(t).view(np.uint8).__dlpack__(), True))
        assert ov.data_ptr() == t.address
        assert ov.data_type() == "tensor(bool)"
        assert ov.numpy().tolist() == values
        del ov


def test_onnxruntime_session_reads_received_and_writes_loan(client):
    """A received tensor is the model's input and a loan its output: ORT reads
    and writes shared memory in place, and the result is published as is."""
    sess = ort.InferenceSession(add_model(), providers=["CPUExecutionProvider"])
    t, src = received(client)
    out_cons = client.consumer("stage/out")
    out_prod = client.producer("stage/out")
    x = ort.OrtValue.from_dlpack(t)
    with out_prod.loan((4, 6), "float32") as loan:
        assert loan.writable
        y = ort.OrtValue.from_dlpack(loan)
        assert y.data_ptr() == loan.address
        binding = sess.io_binding()
        binding.bind_ortvalue_input("x", x)
        binding.bind_ortvalue_output("y", y)
        sess.run_with_iobinding(binding)
        assert y.data_ptr() == loan.address  # ORT wrote into the slot
        del binding, y
        gc.collect()
        assert loan.exports == 0
        loan.publish()
    with out_cons.recv(timeout=1.0) as r:
        np.testing.assert_array_equal(np.asarray(r), src * 2)
    del x
    gc.collect()
    assert t.exports == 0
    t.release()


def test_onnxruntime_recv_mut_in_place(client):
    """A staged (recv_mut) tensor is both input and output of the model."""
    sess = ort.InferenceSession(add_model(), providers=["CPUExecutionProvider"])
    prod = client.producer("stage/in")
    stage = client.stage("stage/in", "stage/out")
    out = client.consumer("stage/out")
    src = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    with prod.loan((3, 4), "float32") as t:
        np.asarray(t)[...] = src
        t.publish()
    with stage.recv_mut(timeout=1.0) as t:
        assert t.writable and t.kind == "staged"
        v = ort.OrtValue.from_dlpack(t)
        assert v.data_ptr() == t.address
        binding = sess.io_binding()
        binding.bind_ortvalue_input("x", v)
        binding.bind_ortvalue_output("y", v)
        sess.run_with_iobinding(binding)
        del binding, v
        gc.collect()
        t.forward()
    with out.recv(timeout=1.0) as r:
        np.testing.assert_array_equal(np.asarray(r), src * 2)


def test_torch_from_dlpack(client):
    torch = pytest.importorskip("torch", reason="torch is not installed (optional)")
    t, src = received(client)
    x = torch.from_dlpack(t)
    assert x.data_ptr() == t.address
    assert x.shape == (4, 6) and x.dtype == torch.float32
    np.testing.assert_array_equal(x.numpy(), src)
    del x
    gc.collect()
    assert t.exports == 0
    t.release()
    prod = client.producer("bcast")
    with prod.loan(8, "int32") as loan:
        y = torch.from_dlpack(loan)
        assert y.data_ptr() == loan.address
        y.fill_(7)
        assert np.asarray(loan).tolist() == [7] * 8
        del y
