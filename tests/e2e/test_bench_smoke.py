"""The benchmark's --quick run: every workload, mode and path runs and gives correct
results (figures are for bench/run.py itself, not for tests)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_benchmark_quick_run_passes():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "W3" in proc.stdout and "W4" in proc.stdout


def test_benchmark_servers_each_run_in_their_own_session():
    """Both servers compete for the CPU as deployed servers do: apart from the clients'
    session (with autogroup scheduling, a server in its clients' session would get only a
    share of their slice, and the comparison with the lean server would be skewed)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("normserve_bench_run", ROOT / "bench" / "run.py")
        assert spec is not None and spec.loader is not None
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        from lean import LeanProcess
    finally:
        sys.path.remove(str(ROOT / "bench"))
    server = bench.start_normserve("none")
    lean = LeanProcess().start()
    try:
        sessions = {os.getsid(0), os.getsid(server.proc.pid), os.getsid(lean.pid)}
        assert len(sessions) == 3
    finally:
        server.stop()
        lean.stop()
