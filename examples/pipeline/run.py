"""The model pipeline in one command: an embedded broker and four processes.

    camera ──camera/raw──▶ preprocess ──model/input──▶ infer ──detections──▶ sink
    (1280x720 RGB u8)      (1x3x352x640 f32)           (PP-OCRv4 det)     (IoU vs truth)

Starts the broker on a thread of this process (private socket), then the
sink, inference, preprocessing and camera processes in that order, each
once the one before has subscribed (and the model has loaded), waits for
them, and prints the time breakdown and one final line:

    pipeline: frames=N fps=F e2e_p50_ms=X e2e_p99_ms=Y hit_rate=H dropped=D

Exit status: 0 when every process succeeded, 1 when one failed or hung,
2 when a dependency is missing (the message says what to install), 130 when
interrupted (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the roles' shared modules (common, detector, report, ...)
REQUIREMENTS = os.path.relpath(os.path.join(HERE, "requirements.txt"))
ROLE_ORDER = ("sink", "infer", "preprocess", "camera")  # consumers first: none misses frame 0
READY_WAIT_S = 180.0


def check_dependencies() -> str | None:
    """None, or what is missing and the pip command that installs it."""
    missing = []
    for module, package in (("numpy", "numpy"), ("cv2", "opencv-python-headless"),
                            ("onnxruntime", "onnxruntime"), ("tensorbus", "tensorbus (pip install ./bindings/python)")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        return f"missing Python packages: {', '.join(missing)}; pip install -r {REQUIREMENTS}"
    import detector

    try:
        detector.model_path()
    except detector.ModelMissing as e:
        return str(e)
    return None


def parse_args(argv=None) -> argparse.Namespace:
    import common

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=300, help="frames the camera publishes (default 300)")
    p.add_argument("--fps", type=float, default=5.0, help="camera frame rate, 0 = as fast as the pipeline goes (default 5)")
    p.add_argument("--frame-size", type=common.parse_size, default=(720, 1280), help="camera HEIGHTxWIDTH (default 720x1280)")
    p.add_argument("--input-size", type=common.parse_size, default=(352, 640),
                   help="model input HEIGHTxWIDTH, multiples of 32 (default 352x640)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--quiet", "-q", action="store_true", help="no per-frame lines, only the summary")
    p.add_argument("--json", metavar="PATH", help="also write the summary as JSON to PATH")
    p.add_argument("--records", metavar="DIR", help="also keep each process's per-frame record (DIR/<role>.json)")
    args = p.parse_args(argv)
    if args.frames < 1:
        p.error("--frames must be at least 1")
    if any(v % 32 for v in args.input_size):
        p.error(f"--input-size must be multiples of 32 (the detector downsamples by 32), got {args.input_size}")
    return args


class Roles:
    """The four child processes: start in order, wait, stop."""

    def __init__(self, args: argparse.Namespace, socket: str, run_dir: str):
        self.args, self.socket, self.run_dir = args, socket, run_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def command(self, role: str) -> list[str]:
        a = self.args
        cmd = [sys.executable, os.path.join(HERE, f"{role}.py"), "--socket", self.socket, "--run-dir", self.run_dir,
               "--frames", str(a.frames), "--frame-size", "x".join(map(str, a.frame_size)),
               "--input-size", "x".join(map(str, a.input_size))]
        if role == "camera":
            cmd += ["--fps", str(a.fps)]
        if role == "infer":
            cmd += ["--threads", str(a.threads)]
        if a.quiet:
            cmd.append("--quiet")
        return cmd

    def start(self, role: str) -> None:
        """Starts ``role`` and waits until it has written its ready marker."""
        proc = subprocess.Popen(self.command(role), cwd=HERE)
        self.procs[role] = proc
        marker = os.path.join(self.run_dir, f"{role}.ready")
        deadline = time.monotonic() + READY_WAIT_S
        while not os.path.exists(marker):
            if proc.poll() is not None:
                raise RuntimeError(f"{role} exited with status {proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{role} was not ready after {READY_WAIT_S:.0f} s")
            time.sleep(0.02)

    def wait(self, timeout_s: float) -> None:
        """Waits for every role to exit; raises on a failure or when ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        pending = dict(self.procs)
        while pending:
            for role, proc in list(pending.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del pending[role]
                if rc != 0:
                    raise RuntimeError(f"{role} exited with status {rc}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"still running after {timeout_s:.0f} s: {', '.join(pending)}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Terminates whatever is still running (children also die with this process: PR_SET_PDEATHSIG)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run(args: argparse.Namespace) -> int:
    import common
    import report
    import tensorbus as tb

    # Ctrl-C or SIGTERM stop the children and remove the private socket and records
    # (SIGINT too when this was started with it ignored, as background jobs of scripts are).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="tb-pipeline-") as run_dir:
        socket = os.path.join(run_dir, "broker.sock")
        config = common.broker_config(args.frame_size, args.input_size, slots=8)
        with tb.Broker(config, socket):
            roles = Roles(args, socket, run_dir)
            try:
                for role in ROLE_ORDER:
                    roles.start(role)
                per_frame_s = 1.0 / args.fps if args.fps > 0 else 0.0
                roles.wait(timeout_s=120 + args.frames * max(per_frame_s, 1.0))
            except RuntimeError as e:
                print(f"pipeline: failed: {e}", file=sys.stderr)
                return 1
            except KeyboardInterrupt as e:
                print(f"pipeline: interrupted ({e or 'SIGINT'})", file=sys.stderr)
                return 130
            finally:
                roles.stop()
        summary = report.summarize(run_dir, args.frames)
        if args.records:
            os.makedirs(args.records, exist_ok=True)
            for role in ROLE_ORDER:
                if os.path.exists(os.path.join(run_dir, f"{role}.json")):
                    shutil.copy(os.path.join(run_dir, f"{role}.json"), args.records)
    print(report.breakdown(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    print(report.final_line(summary), flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = check_dependencies()
    if problem:
        print(f"pipeline: {problem}", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
