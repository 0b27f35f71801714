"""The model pipeline split over two hosts: network namespaces "edge" and
"server" joined by a veth pair, each with its own broker, bridged by
tensorbus-bridge over Zenoh.

    edge:   camera ──camera/raw──▶ preprocess ──model/input──▶ [bridge] ══TCP══╗
    server: [bridge] ──model/input──▶ infer (PP-OCRv4 det) ──detections──▶ [bridge] ═╗
    edge:   [bridge] ──detections──▶ sink (IoU vs truth, e2e latency)  ◀══════════════╝

The roles are examples/pipeline's, unchanged. Needs root (ip netns, veth,
tc), the pipeline's .venv (examples/pipeline/test.sh sets it up) and a built
tensorbus-bridge. Prints the pipeline's breakdown and one final line:

    edge: frames=N fps=F e2e_p50_ms=X e2e_p99_ms=Y hit_rate=H bytes_on_wire=B dropped=D

--rate throttles the edge-to-server direction with tc (e.g. 50mbit);
--quantize int8|f16 sends model/input quantized (the detector gets f32 back).
Exit status: 0 ok, 1 a process failed or hung, 2 a prerequisite is missing.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PIPELINE = os.path.join(ROOT, "examples", "pipeline")
sys.path.insert(0, PIPELINE)

import run as pipeline  # noqa: E402  (examples/pipeline/run.py)

EDGE_IP, SERVER_IP, PORT = "10.219.0.1", "10.219.0.2", 7447
# Which host each role runs on.
HOSTS = {"sink": "edge", "infer": "server", "preprocess": "edge", "camera": "edge"}


def bridge_binary() -> str | None:
    explicit = os.environ.get("TENSORBUS_BRIDGE")
    if explicit:
        return explicit
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    for profile in ("release", "debug"):
        path = os.path.join(target, profile, "tensorbus-bridge")
        if os.path.isfile(path):
            return path
    return None


def sh(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


class Namespaces:
    """edge and server namespaces over a veth pair; removed on exit."""

    def __init__(self, rate: str | None):
        tag = str(os.getpid() % 100000)
        self.ns = {"edge": f"tbedge{tag}", "server": f"tbsrv{tag}"}
        self.dev = {"edge": f"tbve{tag}", "server": f"tbvs{tag}"}
        self.rate = rate

    def __enter__(self) -> "Namespaces":
        try:
            for ns in self.ns.values():
                sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", self.dev["edge"], "type", "veth", "peer", "name", self.dev["server"])
            for host, ip in (("edge", EDGE_IP), ("server", SERVER_IP)):
                ns, dev = self.ns[host], self.dev[host]
                sh("ip", "link", "set", dev, "netns", ns)
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            if self.rate:
                sh("ip", "netns", "exec", self.ns["edge"], "tc", "qdisc", "add", "dev", self.dev["edge"],
                   "root", "tbf", "rate", self.rate, "burst", "64kb", "latency", "400ms")
        except Exception:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class EdgeRoles(pipeline.Roles):
    """examples/pipeline's roles, each on its host's broker and in its namespace."""

    def __init__(self, args, sockets: dict[str, str], nets: Namespaces, run_dir: str):
        super().__init__(args, "", run_dir)
        self.sockets, self.nets = sockets, nets

    def command(self, role: str) -> list[str]:
        host = HOSTS[role]
        self.socket = self.sockets[host]
        return ["ip", "netns", "exec", self.nets.ns[host]] + super().command(role)


def bridge_config(name: str, socket: str, edge: bool, quantize: str) -> str:
    zenoh = f'listen = ["tcp/{EDGE_IP}:{PORT}"]' if edge else f'connect = ["tcp/{EDGE_IP}:{PORT}"]'
    text = f'name = "{name}"\n[broker]\nsocket = "{socket}"\n[zenoh]\n{zenoh}\n'
    if edge:
        text += f'[[export]]\nchannel = "model/input"\nquantize = "{quantize}"\n'
        text += '[[import]]\nkey = "tensorbus/detections"\nchannel = "detections"\n'
    else:
        text += '[[import]]\nkey = "tensorbus/model/input"\nchannel = "model/input"\n'
        text += '[[export]]\nchannel = "detections"\n'
    return text


class Bridges:
    """The two tensorbus-bridge processes; their final report lines give the counters."""

    def __init__(self, binary: str, nets: Namespaces, sockets: dict[str, str], run_dir: str, quantize: str):
        self.binary, self.nets, self.sockets, self.run_dir, self.quantize = binary, nets, sockets, run_dir, quantize
        self.procs: dict[str, subprocess.Popen] = {}

    def log(self, host: str) -> str:
        return os.path.join(self.run_dir, f"bridge-{host}.log")

    def start(self) -> None:
        for host in ("edge", "server"):
            cfg = os.path.join(self.run_dir, f"bridge-{host}.toml")
            with open(cfg, "w") as f:
                f.write(bridge_config(f"bridge-{host}", self.sockets[host], host == "edge", self.quantize))
            with open(self.log(host), "w") as log:
                self.procs[host] = subprocess.Popen(
                    ["ip", "netns", "exec", self.nets.ns[host], self.binary, "--config", cfg, "--report-secs", "0"],
                    stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 60
        for host in ("edge", "server"):
            while "ready:" not in open(self.log(host)).read():
                if self.procs[host].poll() is not None:
                    raise RuntimeError(f"bridge on {host} exited: {open(self.log(host)).read().strip()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bridge on {host} not ready after 60 s")
                time.sleep(0.02)

    def stop(self) -> dict[str, int]:
        """SIGTERM both, then the sums of their export routes' counters."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        totals = {"bytes": 0, "raw_bytes": 0, "dropped": 0}
        for host in self.procs:
            for line in open(self.log(host)):
                m = re.search(r"\]: (export|import) .*samples=\d+ bytes=(\d+) raw_bytes=(\d+) dropped=(\d+)", line)
                if m and m.group(1) == "export":
                    totals["bytes"] += int(m.group(2))
                    totals["raw_bytes"] += int(m.group(3))
                if m:
                    totals["dropped"] += int(m.group(4))
        return totals


def main(argv=None) -> int:
    import common

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--fps", type=float, default=5.0, help="camera frame rate, 0 = as fast as it goes (default 5)")
    p.add_argument("--rate", help="throttle edge to server with tc tbf, e.g. 50mbit")
    p.add_argument("--quantize", choices=("none", "int8", "f16"), default="none",
                   help="send model/input quantized (default none)")
    p.add_argument("--quiet", "-q", action="store_true")
    a = p.parse_args(argv)
    args = pipeline.parse_args(["--frames", str(a.frames), "--fps", str(a.fps)] + (["--quiet"] if a.quiet else []))

    problem = pipeline.check_dependencies()
    if problem:
        print(f"edge: {problem}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("edge: needs root (ip netns, veth, tc)", file=sys.stderr)
        return 2
    binary = bridge_binary()
    if not binary:
        print("edge: no tensorbus-bridge; build it: cargo build --release -p tensorbus-bridge", file=sys.stderr)
        return 2
    import report
    import tensorbus as tb

    signal.signal(signal.SIGTERM, pipeline._interrupt)
    with tempfile.TemporaryDirectory(prefix="tb-edge-") as run_dir:
        os.chmod(run_dir, 0o755)
        sockets = {h: os.path.join(run_dir, h, "broker.sock") for h in ("edge", "server")}
        for s in sockets.values():
            os.makedirs(os.path.dirname(s), exist_ok=True)
        config = common.broker_config(args.frame_size, args.input_size, slots=8)
        with Namespaces(a.rate) as nets, tb.Broker(config, sockets["edge"]), tb.Broker(config, sockets["server"]):
            roles = EdgeRoles(args, sockets, nets, run_dir)
            bridges = Bridges(binary, nets, sockets, run_dir, a.quantize)
            totals = {"bytes": 0, "raw_bytes": 0, "dropped": 0}
            try:
                roles.start("sink")
                bridges.start()
                for role in ("infer", "preprocess", "camera"):
                    roles.start(role)
                per_frame_s = 1.0 / args.fps if args.fps > 0 else 0.0
                roles.wait(timeout_s=120 + args.frames * max(per_frame_s, 1.0))
            except RuntimeError as e:
                print(f"edge: failed: {e}", file=sys.stderr)
                return 1
            except KeyboardInterrupt as e:
                print(f"edge: interrupted ({e or 'SIGINT'})", file=sys.stderr)
                return 130
            finally:
                roles.stop()
                totals = bridges.stop()
        summary = report.summarize(run_dir, args.frames)
    print(report.breakdown(summary))
    print(f"edge: model/input quantize={a.quantize} rate={a.rate or 'unthrottled'} "
          f"wire/raw={totals['bytes'] / max(totals['raw_bytes'], 1):.3f}")
    print(f"edge: frames={summary['frames']} fps={summary['fps']:.1f} e2e_p50_ms={summary['e2e_p50_ms']:.1f} "
          f"e2e_p99_ms={summary['e2e_p99_ms']:.1f} hit_rate={summary['hit_rate']:.3f} "
          f"bytes_on_wire={totals['bytes']} dropped={summary['dropped'] + totals['dropped']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
