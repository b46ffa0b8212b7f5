"""The README's seed example runs against a real server and prints what the README says."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_seed_example_normalizes_to_zero_mean_unit_std(server):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "grayscale_batchnorm.py"), "--target", server.target],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    values = {
        (line.split(":")[0].strip(), key): float(val)
        for line in out.splitlines() if ":" in line
        for key, val in re.findall(r"(\w+)=(-?[\d.]+)", line)
    }
    assert abs(values[("input", "mean")] - 0.4865) < 5e-4
    assert abs(values[("input", "std")] - 0.1834) < 5e-4
    assert abs(values[("output", "mean")]) < 1e-3
    assert abs(values[("output", "std")] - 1.0) < 1e-3
    weight, bias = re.search(r"weight=([\d.-]+) bias=([\d.-]+)", out).groups()
    assert (float(weight), float(bias)) == (1.0, 0.0)
