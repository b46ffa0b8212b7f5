"""Packaging and layering: what the wheel holds, and which imports each layer may pull in.

pyproject.toml maps the source folders to namespaced import names (normserve,
normserve.server, normserve.client). DESIGN.md section 7: the engine knows nothing of gRPC;
the client SDK works without torch.
"""

from __future__ import annotations

import ast
import email.parser
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
_IGNORE = shutil.ignore_patterns(
    ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "*.whl"
)


def _run(code: str, *, env: dict | None = None, timeout: float = 120, cwd: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """Build the wheel from a copy of the working tree (the build leaves build/ and
    *.egg-info behind, which must not land in the checkout)."""
    base = tmp_path_factory.mktemp("wheel")
    src, out = base / "src", base / "out"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    out.mkdir()
    _run(f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))", cwd=str(src), timeout=180)
    wheels = list(out.glob("normserve-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def wheel_names(wheel) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


@pytest.fixture(scope="module")
def unpacked(wheel, tmp_path_factory) -> pathlib.Path:
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    return target


# -- wheel contents ------------------------------------------------------------------------
def test_wheel_top_level_is_only_normserve(wheel_names):
    tops = {n.split("/", 1)[0] + ("/" if "/" in n else "") for n in wheel_names}
    dist_info = {t for t in tops if t.endswith(".dist-info/")}
    assert len(dist_info) == 1 and next(iter(dist_info)).startswith("normserve-")
    stray = tops - dist_info - {"normserve/"}
    assert not stray, f"wheel installs top-level entries besides normserve/: {sorted(stray)}"
    for bare in ("server/", "client/", "tests/", "tools/", "src/", "proto/", "scripts/"):
        assert bare not in tops


def test_wheel_has_the_namespaced_packages(wheel_names):
    names = set(wheel_names)
    for required in (
        "normserve/__init__.py",
        "normserve/__main__.py",
        "normserve/cli.py",
        "normserve/client/__init__.py",
        "normserve/client/codec.py",
        "normserve/client/py.typed",
        "normserve/client/_proto/__init__.py",
        "normserve/client/_proto/normserve_pb2.py",
        "normserve/client/_proto/normserve_pb2.pyi",
        "normserve/client/_proto/normserve_pb2_grpc.py",
        "normserve/server/__init__.py",
        "normserve/server/app.py",
        "normserve/server/settings.py",
        "normserve/server/metrics.py",
        "normserve/server/engine/__init__.py",
        "normserve/server/transport/__init__.py",
    ):
        assert required in names, f"{required} missing from the wheel"


def test_wheel_has_every_source_module(wheel_names):
    """Every .py under the mapped source folders ships (a subpackage missing from
    [tool.setuptools] packages would silently drop out of the wheel)."""
    names = set(wheel_names)
    mapping = {"src/normserve": "normserve", "client": "normserve/client", "server": "normserve/server"}
    for folder, prefix in mapping.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).as_posix()
            assert f"{prefix}/{rel}" in names, f"{folder}/{rel} is not packaged as {prefix}/{rel}"
    generated = sorted(p.name for p in (ROOT / "client" / "_proto").iterdir() if p.suffix in (".py", ".pyi"))
    packaged = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("normserve/client/_proto/"))
    assert packaged == generated


def test_wheel_metadata(wheel_names, wheel):
    with zipfile.ZipFile(wheel) as z:
        dist = next(n.split("/", 1)[0] for n in wheel_names if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(f"{dist}/METADATA").decode())
        entry_points = z.read(f"{dist}/entry_points.txt").decode()
    assert meta["Name"] == "normserve"
    requires = meta.get_all("Requires-Dist") or []
    base = [r for r in requires if "extra ==" not in r]
    base_names = {r.split(";")[0].split("<")[0].split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in base}
    assert {"grpcio", "protobuf", "numpy"} <= base_names
    assert "torch" not in base_names, "torch must stay optional for the client"
    assert any(r.startswith("torch") and "server" in r for r in requires), requires
    assert "[console_scripts]" in entry_points
    assert "normserve = normserve.cli:main" in entry_points


def test_unpacked_wheel_imports_from_itself(unpacked):
    """The wheel alone (not the editable checkout) provides every package."""
    proc = _run(
        f"""
        import sys
        sys.path.insert(0, {str(unpacked)!r})
        import normserve, normserve.cli, normserve.client, normserve.client._proto.normserve_pb2_grpc
        import normserve.server.app, normserve.server.engine, normserve.server.transport.servicer
        import pkgutil, importlib
        for pkg in (normserve.server.engine, normserve.server.transport, normserve.client):
            for m in pkgutil.iter_modules(pkg.__path__):
                importlib.import_module(pkg.__name__ + "." + m.name)
        for name, mod in sorted(sys.modules.items()):
            if name == "normserve" or name.startswith("normserve."):
                assert mod.__file__.startswith({str(unpacked)!r}), (name, mod.__file__)
        print("ok")
        """
    )
    assert proc.stdout.strip().endswith("ok")


# -- layering: the client needs no torch, the engine no gRPC --------------------------------
_BLOCK_TORCH = """
import sys
class _NoTorch:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test ({name})")
        return None
sys.meta_path.insert(0, _NoTorch)
try:
    import torch  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("torch blocker does not work")
"""


def test_client_works_without_torch():
    proc = _run(
        _BLOCK_TORCH
        + """
import numpy as np
import normserve
import normserve.client
from normserve.client import Client, NormServeError, codec, errors
from normserve.client.errors import InvalidArgumentError

c = Client("127.0.0.1:1", timeout=1)
x = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
t = codec.encode(x)
y = codec.to_numpy(t)
assert y.shape == (3, 2) and (y == x).all()
assert not codec.is_torch(x)
spec = codec.kwargs_to_spec("BatchNorm2d", {"num_features": 3, "momentum": None, "dtype": "float64"})
assert codec.spec_to_kwargs(spec) == ("BatchNorm2d", {"num_features": 3, "momentum": None, "dtype": "float64"})
try:
    codec.to_torch(t)
except codec.CodecError as e:
    assert "torch" in str(e), e
else:
    raise SystemExit("to_torch without torch should raise CodecError")
# A call fails with the SDK's error type (nothing listens on port 1), not an ImportError.
try:
    c.get_layer("x")
except NormServeError as e:
    pass
c.close()
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch got imported"
print("ok")
"""
    )
    assert proc.stdout.strip().endswith("ok")


def _engine_modules() -> list[str]:
    import normserve.server.engine as engine

    return ["normserve.server.engine"] + [
        f"normserve.server.engine.{p.stem}"
        for p in sorted(pathlib.Path(engine.__path__[0]).glob("*.py"))
        if p.stem != "__init__"
    ]


def test_engine_import_does_not_import_grpc():
    modules = _engine_modules()
    proc = _run(
        f"""
        import importlib, sys
        for name in {modules!r}:
            importlib.import_module(name)
        bad = sorted(m for m in sys.modules
                     if m == "grpc" or m.startswith(("grpc.", "grpc_", "normserve.server.transport"))
                     or m.endswith("_pb2_grpc"))
        assert not bad, f"importing the engine pulled in {{bad}}"
        print("ok", len({modules!r}))
        """
    )
    assert proc.stdout.split()[0] == "ok"


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative: resolve against normserve.server.engine
                parts = ["normserve", "server", "engine"][: 3 - (node.level - 1)]
                mod = ".".join(parts + ([mod] if mod else []))
            found += [(node.lineno, mod)] + [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return found


def test_engine_sources_have_no_grpc_or_transport_imports():
    import normserve.server.engine as engine

    files = sorted(pathlib.Path(engine.__path__[0]).glob("*.py"))
    assert files
    offenders = []
    for path in files:
        for lineno, name in _imports(path):
            top = name.split(".")[0]
            if (
                top == "grpc"
                or top.startswith("grpc_")
                or name.startswith(("normserve.server.transport", "normserve.server.app"))
                or name.endswith("_pb2_grpc")
            ):
                offenders.append(f"{path.name}:{lineno}: {name}")
        assert "import grpc" not in path.read_text(), path
    assert not offenders, "engine must know nothing of gRPC/transport:\n" + "\n".join(offenders)
