"""The launcher's summary: merges the four roles' per-frame records into the
final line and a breakdown of where a frame's time goes (IPC calls versus
the model versus the rest), in CPU time and in wall time."""

from __future__ import annotations

import json
import os

import numpy as np

ROLES = ("camera", "preprocess", "infer", "sink")
# Per role, the steps that are tensorbus calls (loan, publish, recv, release, numpy views of slots).
IPC_STEPS = {
    "camera": ("loan", "publish"),
    "preprocess": ("recv", "loan", "release", "publish"),
    "infer": ("recv", "loan", "release", "publish"),
    "sink": ("recv", "release"),
}
IPC_CALLS = 14  # camera loan+publish; preprocess recv+loan+release+publish; infer recv+2 loans+release+2 publishes; sink recv+release
MODEL_STEPS = (("infer", "model"),)
BIND_STEPS = (("infer", "bind"),)
COMPUTE_STEPS = (("camera", "draw"), ("preprocess", "resize"), ("preprocess", "normalize"),
                 ("infer", "postprocess"), ("sink", "match"))
HOPS = (("camera → preprocess", "preprocess"), ("preprocess → infer", "infer"), ("infer → sink", "sink"))
_NOT_STEPS = ("frame", "arrived_ns", "hit", "min_iou", "extra", "boxes")


def load(run_dir: str) -> dict[str, dict]:
    """Each role's saved record (``<run_dir>/<role>.json``); a role that saved none gets empty columns."""
    records = {}
    for role in ROLES:
        path = os.path.join(run_dir, f"{role}.json")
        if os.path.exists(path):
            with open(path) as f:
                records[role] = json.load(f)
        else:
            records[role] = {"role": role, "columns": {}}
    return records


def _per_frame_ms(records: dict, steps, frames, suffix: str) -> np.ndarray:
    """Per frame the sink saw, the sum of the given (role, step) times in ms (``suffix`` "" = wall, "_cpu" = CPU)."""
    tables = []
    for role, step in steps:
        cols = records[role]["columns"]
        tables.append(dict(zip(cols.get("frame", []), cols.get(step + suffix, []))))
    return np.array([sum(t.get(f, 0.0) for t in tables) for f in frames], np.float64) / 1000.0


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else 0.0


def _pct(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def _times(records: dict, frames, suffix: str) -> dict:
    """Mean ms per frame of IPC, model, ORT binding and the other compute steps, and the IPC share."""
    ipc = _per_frame_ms(records, [(r, s) for r, steps in IPC_STEPS.items() for s in steps], frames, suffix)
    model = _per_frame_ms(records, MODEL_STEPS, frames, suffix)
    bind = _per_frame_ms(records, BIND_STEPS, frames, suffix)
    compute = {f"{r}.{s}": _mean(_per_frame_ms(records, [(r, s)], frames, suffix)) for r, s in COMPUTE_STEPS}
    work = _mean(ipc) + _mean(model) + _mean(bind) + sum(compute.values())
    return {
        "ipc_ms": _mean(ipc),
        "ipc_p50_ms": _pct(ipc, 50),
        "model_ms": _mean(model),
        "model_p50_ms": _pct(model, 50),
        "ort_bind_ms": _mean(bind),
        "compute_ms": compute,
        "work_ms": work,
        "ipc_share": _mean(ipc) / work if work > 0 else 0.0,
        "model_share": _mean(model) / work if work > 0 else 0.0,
    }


def summarize(run_dir: str, frames: int) -> dict:
    """The run's figures: the final line's fields, the time breakdown (ms) and per-step means (µs)."""
    records = load(run_dir)
    sink = records["sink"]["columns"]
    seen = sink.get("frame", [])
    received = len(seen)
    arrived = sink.get("arrived_ns", [])
    span_s = (max(arrived) - min(arrived)) / 1e9 if received > 1 else 0.0
    e2e_ms = np.array(sink.get("e2e", []), np.float64) / 1000.0
    return {
        "frames": frames,
        "received": received,
        "dropped": frames - received,
        "fps": (received - 1) / span_s if span_s > 0 else 0.0,
        "e2e_p50_ms": _pct(e2e_ms, 50),
        "e2e_p99_ms": _pct(e2e_ms, 99),
        "hit_rate": sum(sink.get("hit", [])) / frames if frames else 0.0,
        "min_iou": min(sink.get("min_iou", []), default=0.0),
        "extra_boxes": int(sum(sink.get("extra", []))),
        # The first frame is left out of the time breakdown: its receives hold the start-up wait.
        "cpu": _times(records, seen[1:], "_cpu"),
        "wall": _times(records, seen[1:], ""),
        "hop_p50_ms": {name: _pct(np.array(records[role]["columns"].get("hop", [])) / 1000.0, 50)
                       for name, role in HOPS},
        "onnx_threads": records["infer"].get("threads"),
        "step_means_us": {role: {k: round(float(np.mean(v)), 1) for k, v in rec["columns"].items()
                                 if k not in _NOT_STEPS and v}
                          for role, rec in records.items()},
    }


def final_line(s: dict) -> str:
    """``pipeline: frames=N fps=F e2e_p50_ms=X e2e_p99_ms=Y hit_rate=H dropped=D``."""
    return (
        f"pipeline: frames={s['frames']} fps={s['fps']:.1f} e2e_p50_ms={s['e2e_p50_ms']:.1f} "
        f"e2e_p99_ms={s['e2e_p99_ms']:.1f} hit_rate={s['hit_rate']:.3f} dropped={s['dropped']}"
    )


def _ratio(model: float, ipc: float) -> str:
    return f"1/{model / ipc:.0f}" if ipc > 0 else "-"


def breakdown(s: dict) -> str:
    """Where a frame's time goes, summed over the four processes, CPU and wall."""
    cpu, wall = s["cpu"], s["wall"]
    rows = [
        ("model (run_with_iobinding)", cpu["model_ms"], wall["model_ms"]),
        (f"IPC ({IPC_CALLS} loan/publish/recv/release calls)", cpu["ipc_ms"], wall["ipc_ms"]),
        ("ORT binding (OrtValue + IO binding)", cpu["ort_bind_ms"], wall["ort_bind_ms"]),
    ]
    rows += [(name, cpu["compute_ms"][name], wall["compute_ms"][name]) for name in cpu["compute_ms"]]
    lines = ["time per frame, summed over the four processes (ms, mean of frames 1..N-1)  CPU      wall"]
    lines += [f"  {name:<58}{c:8.3f}  {w:8.3f}" for name, c, w in rows]
    lines.append(f"  {'IPC share of the frame work':<58}{100 * cpu['ipc_share']:7.2f}%  {100 * wall['ipc_share']:7.2f}%")
    lines.append(f"  {'model share of the frame work':<58}{100 * cpu['model_share']:7.2f}%  {100 * wall['model_share']:7.2f}%")
    lines.append(f"  {'IPC time / model time':<58}{_ratio(cpu['model_ms'], cpu['ipc_ms']):>8}  "
                 f"{_ratio(wall['model_ms'], wall['ipc_ms']):>8}")
    hops = ", ".join(f"{k} {v:.2f}" for k, v in s["hop_p50_ms"].items())
    lines.append(f"hop latency p50 (publish → in the receiver's hands, queueing included, ms): {hops}")
    for role, steps in s["step_means_us"].items():
        lines.append(f"  {role} µs/frame: " + " ".join(f"{k}={v:g}" for k, v in steps.items()))
    lines.append(f"detections: lowest IoU of a true box {s['min_iou']:.2f}, boxes matching no text {s['extra_boxes']}")
    return "\n".join(lines)
