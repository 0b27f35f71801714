"""`python -m tensorbus.bench --quick --json` runs and reports every transport (not the numbers)."""

import json
import os
import subprocess
import sys

from tensorbus import bench

PYDIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")


def test_bench_quick_is_complete(tmp_path):
    out = tmp_path / "out.json"
    env = dict(os.environ, PYTHONPATH=PYDIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(
        [sys.executable, "-m", "tensorbus.bench", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    assert "| tensorbus |" in p.stdout
    res = json.loads(out.read_text())
    assert res["sizes"] == [0, 1 << 20, 16 << 20]
    rows = {r["transport"]: r for r in res["results"]}
    assert set(rows) == set(bench.TRANSPORTS)
    for name in ("tensorbus", "mp.Queue", "shm+Pipe"):
        assert rows[name]["status"] == "ok", rows[name]
    for name, r in rows.items():
        if r["status"] == "ok":
            for n in res["sizes"]:
                cell = r[str(n)]
                assert cell["n"] > 0 and 0 < cell["p50_us"] <= cell["p99_us"], (name, n, cell)
        else:
            assert r["status"].startswith("not available"), r  # honest, never faked
    assert set(res["inprocess"]) == {str(1 << 20), str(16 << 20)}
    assert "tensorbus_16MiB_rtt_p50 / inprocess_16MiB_write_read_p50" in res["ratios"]
    assert res["machine"]["nproc"] >= 1


def test_bench_work_measures_the_python_side():
    ns = bench.python_work(n=200, repeats=1)
    assert 0 < ns < 10_000_000
