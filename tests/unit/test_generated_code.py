"""The generated gRPC code in client/_proto must match what proto/ generates now."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_code_is_current(tmp_path):
    out = tmp_path / "_proto"
    subprocess.run([sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--out", str(out)], check=True)
    committed = ROOT / "client" / "_proto"
    fresh = {p.name: p.read_text() for p in out.iterdir() if p.is_file()}
    current = {p.name: p.read_text() for p in committed.iterdir() if p.is_file() and p.suffix in (".py", ".pyi")}
    assert sorted(fresh) == sorted(current), "generated file set changed: run python tools/gen_proto.py"
    stale = [name for name in fresh if fresh[name] != current[name]]
    assert not stale, f"stale generated code {stale}: run python tools/gen_proto.py"
