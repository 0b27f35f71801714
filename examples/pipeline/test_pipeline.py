"""Tests of the model pipeline: a short run of the whole thing through
``run.sh``, and the zero-copy claims one by one (the camera draws in the
slot, preprocessing writes the model input in the slot, onnxruntime reads
its input from a slot and writes its output into a loaned slot).

Without opencv, onnxruntime, tensorbus or the detector model the tests skip;
with ``TENSORBUS_REQUIRE_PIPELINE=1`` (CI) they fail instead.
Run: ``examples/pipeline/test.sh`` (installs the pins into .venv first).
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402  (only the standard library at import time)

FINAL_LINE = re.compile(
    r"^pipeline: frames=(\d+) fps=(\d+\.\d) e2e_p50_ms=(\d+\.\d) e2e_p99_ms=(\d+\.\d) "
    r"hit_rate=(\d\.\d{3}) dropped=(\d+)$"
)
FRAME = (720, 1280)
MODEL_INPUT = (352, 640)


@pytest.fixture(scope="module")
def deps():
    """Skips (or, with TENSORBUS_REQUIRE_PIPELINE=1, fails) when a dependency is missing."""
    problem = run.check_dependencies()
    if problem:
        if os.environ.get("TENSORBUS_REQUIRE_PIPELINE") == "1":
            pytest.fail(f"TENSORBUS_REQUIRE_PIPELINE=1 but {problem}", pytrace=False)
        pytest.skip(problem)


@pytest.fixture
def client(deps):
    """A client of a private embedded broker with the pipeline's pools and channels."""
    import common
    import tensorbus as tb

    with tempfile.TemporaryDirectory(prefix="tb-pipeline-test-") as d:
        with tb.Broker(common.broker_config(FRAME, MODEL_INPUT), os.path.join(d, "broker.sock")) as b:
            with tb.Client(b.socket, name="test") as c:
                yield c


@pytest.fixture(scope="module")
def session(deps):
    import detector

    return detector.session(threads=1)


def test_short_run(deps, tmp_path):
    """The one command, end to end: every frame arrives, the text is found."""
    frames = 30
    summary_path = tmp_path / "summary.json"
    proc = subprocess.run(
        [os.path.join(HERE, "run.sh"), "--frames", str(frames), "--fps", "5", "--quiet", "--json", str(summary_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    m = FINAL_LINE.match(last)
    assert m, f"unexpected final line: {last!r}"
    n, fps, p50, p99, hit_rate, dropped = m.groups()
    assert int(n) == frames
    assert int(dropped) == 0, proc.stdout
    assert float(hit_rate) >= 0.95, proc.stdout
    assert 0 < float(p50) <= float(p99)
    assert float(fps) > 0
    summary = json.loads(summary_path.read_text())
    assert summary["received"] == frames
    assert 0 < summary["cpu"]["ipc_ms"] < summary["cpu"]["model_ms"]
    assert "IPC share of the frame work" in proc.stdout


def test_timestamps_are_clock_monotonic(client):
    """tensorbus stamps ``timestamp_ns`` with CLOCK_MONOTONIC at publish: the sink's e2e uses the same clock."""
    import common

    prod, cons = client.producer(common.DETECTIONS), client.consumer(common.DETECTIONS)
    before = common.now_ns()
    with prod.loan((0, 5), "float32") as t:
        t.publish(user_header=common.FRAME_HEADER.pack(7, before))
    after = common.now_ns()
    with cons.recv(timeout=5) as t:
        assert before <= t.timestamp_ns <= after
        assert common.FRAME_HEADER.unpack(t.user_header[: common.FRAME_HEADER.size]) == (7, before)
        assert t.shape == (0, 5)


def test_camera_draws_in_the_slot(client):
    """The frame is drawn straight into the loaned slot (no frame-sized array elsewhere)."""
    import numpy as np

    import common
    import scene

    painter = scene.Painter(*FRAME)
    prod, cons = client.producer(common.RAW), client.consumer(common.RAW)
    with prod.loan((*FRAME, 3), "uint8") as t:
        view = np.asarray(t)
        assert view.ctypes.data == t.address and view.flags.writeable
        painter.draw(12, view)
        assert view.ctypes.data == t.address  # cv2.putText drew in place, no replacement array
        del view
        t.publish(user_header=common.FRAME_HEADER.pack(12, 0))
    expected = np.empty((*FRAME, 3), np.uint8)
    painter.draw(12, expected)
    with cons.recv(timeout=5) as t:
        got = np.asarray(t)
        np.testing.assert_array_equal(got, expected)
        x0, y0, x1, y1 = scene.truth_boxes(12, *FRAME)[0]
        assert got[y0:y1, x0:x1].min() < 40  # the dark first line of text is there


def test_preprocess_writes_the_model_input_in_the_slot(client):
    """Resize into one reused scratch image, then normalise straight into the float32 slot."""
    import cv2
    import numpy as np

    import common
    import scene
    from normalize import Resizer

    frame = np.empty((*FRAME, 3), np.uint8)
    scene.Painter(*FRAME).draw(3, frame)
    resizer = Resizer(*MODEL_INPUT)
    scratch = resizer.scratch.ctypes.data
    prod = client.producer(common.INPUT)
    with prod.loan((1, 3, *MODEL_INPUT), "float32") as t:
        out = np.asarray(t)
        resizer(frame, out)
        assert out.ctypes.data == t.address and resizer.scratch.ctypes.data == scratch
        small = cv2.resize(frame, MODEL_INPUT[::-1], interpolation=resizer.interpolation)
        reference = small[..., ::-1].transpose(2, 0, 1).astype(np.float32) / 255.0 * 2.0 - 1.0
        np.testing.assert_allclose(out[0], reference, atol=1e-6)
        del out


def test_model_reads_and_writes_slots_in_place(client, session):
    """onnxruntime's input is the received slot itself and IO binding writes the
    probability map into a loaned slot: pointer equality on both, and the map
    written there equals a plain ``session.run``."""
    import numpy as np

    import common
    import detector
    import infer
    import scene
    import sink
    from normalize import Resizer

    frame = np.empty((*FRAME, 3), np.uint8)
    scene.Painter(*FRAME).draw(40, frame)
    inputs_out, inputs_in = client.producer(common.INPUT), client.consumer(common.INPUT)
    probs_out, probs_in = client.producer(common.PROB), client.consumer(common.PROB)
    with inputs_out.loan((1, 3, *MODEL_INPUT), "float32") as t:
        Resizer(*MODEL_INPUT)(frame, np.asarray(t))
        t.publish()
    x = inputs_in.recv(timeout=5)
    x_view = np.asarray(x)
    assert not x_view.flags.writeable
    reference = session.run(None, {detector.INPUT_NAME: x_view})[0]

    prob = probs_out.loan((1, 1, *MODEL_INPUT), "float32")
    prob_view = np.asarray(prob)
    prob_view.fill(-1.0)
    out_name = detector.output_name(session)
    binding, (x_ort, prob_ort) = infer.bind(session, out_name, x_view, prob_view, x.address, prob.address)
    assert x_ort.data_ptr() == x.address  # input: the received slot, not a copy
    assert prob_ort.data_ptr() == prob.address
    session.run_with_iobinding(binding)
    assert binding.get_outputs()[0].data_ptr() == prob.address  # ORT wrote its output into the loan
    np.testing.assert_allclose(prob_view, reference, atol=1e-5)
    del binding, x_ort, prob_ort, x_view
    gc.collect()
    assert x.exports == 0
    x.release()

    boxes = detector.boxes_from_prob(prob_view[0, 0], FRAME[1] / MODEL_INPUT[1], FRAME[0] / MODEL_INPUT[0], *FRAME[::-1])
    best, _ = sink.match(scene.truth_boxes(40, *FRAME), boxes)
    assert (best >= sink.IOU_HIT).all(), best
    del prob_view
    prob.publish()
    with probs_in.recv(timeout=5) as t:  # the published map is the one ORT wrote
        np.testing.assert_allclose(np.asarray(t), reference, atol=1e-5)


def test_iou_and_match(deps):
    import numpy as np

    import sink

    truth = np.array([[0, 0, 10, 10], [20, 20, 30, 30]])
    found = np.array([[0, 0, 10, 20, 0.9], [100, 100, 110, 110, 0.8]], np.float32)
    ious = sink.iou_matrix(truth, found)
    assert ious[0, 0] == pytest.approx(0.5) and ious[0, 1] == 0 and ious[1, 0] == 0
    best, extra = sink.match(truth, found)
    assert best.tolist() == pytest.approx([0.5, 0.0]) and extra == 1
    best, extra = sink.match(truth, np.zeros((0, 5), np.float32))
    assert best.tolist() == [0.0, 0.0] and extra == 0


def test_missing_model_says_how_to_install(deps, monkeypatch):
    import importlib.util

    import detector

    monkeypatch.delenv("TENSORBUS_DET_MODEL", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(detector.ModelMissing, match=r"pip install --no-deps rapidocr_onnxruntime==1\.4\.4"):
        detector.model_path()


def test_run_exits_2_with_the_install_hint_when_the_model_is_missing(deps):
    env = dict(os.environ, TENSORBUS_DET_MODEL="/nonexistent/det.onnx")
    proc = subprocess.run([os.path.join(HERE, "run.sh"), "--frames", "1"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 2
    assert "pip install --no-deps rapidocr_onnxruntime==1.4.4" in proc.stderr
