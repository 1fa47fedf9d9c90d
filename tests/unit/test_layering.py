"""The package layering (README.md, Layout): which parts of `runtime` may import which.

Every .py under runtime/ is parsed, and every import in it counts: module level, inside
functions, under `if TYPE_CHECKING:`, relative ones, and `importlib.import_module("...")`
with a literal name. A rule names the files it covers and the packages they must not import.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "runtime"

WORKERS_AND_UP = ("runtime.decode", "runtime.prefill", "runtime.tokenizer", "runtime.transfer", "runtime.controller",
                  "runtime.lang")
# (files: a module path or a package folder, relative to the repository root; forbidden packages)
RULES: list[tuple[str, tuple[str, ...]]] = [
    ("runtime/engine/", WORKERS_AND_UP),
    ("runtime/config.py", ("runtime.engine",)),
    ("runtime/tokenizer/", ("runtime.engine",)),
    ("runtime/transfer/", ("runtime.engine",)),
    ("runtime/controller/", ("runtime.engine",)),
    ("runtime/common/", ("runtime.engine", *WORKERS_AND_UP)),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(path: Path, level: int, module: str | None) -> str:
    """The absolute name of `from <level dots><module> import ...` in `path`."""
    if level == 0:
        return module or ""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()  # a module's package
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in `path`; `from a import b` yields both a
    and a.b (b may be a submodule: `from runtime import engine`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(path, node.level, node.module)
            yield node.lineno, base
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{base}.{alias.name}"
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
                   or isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))):
            yield node.lineno, node.args[0].value


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(rules: list[tuple[str, tuple[str, ...]]] = RULES) -> list[str]:
    found = []
    for path in sorted(RUNTIME.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for scope, forbidden in rules:
            if not (rel == scope or scope.endswith("/") and rel.startswith(scope)):
                continue
            seen = set()
            for line, name in sorted(imports_of(path)):
                bad = next((p for p in forbidden if _within(name, p)), None)
                if bad and (line, bad) not in seen:
                    seen.add((line, bad))
                    found.append(f"{rel}:{line}: imports {name} ({scope} must not import {bad})")
    return found


def test_layering() -> None:
    found = violations()
    assert not found, "layering broken:\n" + "\n".join(found)


def test_the_rules_cover_existing_code() -> None:
    # A rule whose scope matches nothing (a package renamed) would pass vacuously.
    for scope, _ in RULES:
        assert (ROOT / scope).exists(), scope


def test_the_check_sees_every_kind_of_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "runtime" / "common"
    pkg.mkdir(parents=True)
    (pkg / "bad.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import runtime.engine.core\n"
        "from runtime import engine\n"
        "from ..engine import kv_pool\n"
        "if TYPE_CHECKING:\n"
        "    from runtime.transfer.base import PagedKVMemory\n"
        "def f():\n"
        "    from runtime.decode.worker import DecodeWorker\n"
        "    import importlib\n"
        "    importlib.import_module('runtime.lang')\n"
        "from runtime.config import EngineConfig\n"  # allowed
        "from runtime.engineering import x\n"  # not runtime.engine
    )
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(globals(), "RUNTIME", tmp_path / "runtime")
    found = violations([("runtime/common/", ("runtime.engine", *WORKERS_AND_UP))])
    assert [f.split(": imports ")[0] for f in found] == [f"runtime/common/bad.py:{n}" for n in (2, 3, 4, 6, 8, 10)], found


def test_the_lower_layers_load_no_engine_module() -> None:
    # The rules above see direct imports; this sees what importing the gateway, controller,
    # transfer, config and common packages pulls in through shared modules (runtime/messages.py).
    code = (
        "import importlib, pkgutil, sys\n"
        "mods = ['runtime.config', 'runtime.messages']\n"
        "for pkg in ('runtime.common', 'runtime.tokenizer', 'runtime.transfer', 'runtime.controller'):\n"
        "    mods += [pkg] + [f'{pkg}.{m.name}' for m in pkgutil.iter_modules(importlib.import_module(pkg).__path__)]\n"
        "for m in mods:\n"
        "    importlib.import_module(m)\n"
        "    engine = sorted(k for k in sys.modules if k == 'runtime.engine' or k.startswith('runtime.engine.'))\n"
        "    if engine:\n"
        "        sys.exit(f'importing {m} loaded {engine}')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_gateway_wants_a_resolved_model() -> None:
    # The launcher resolves the default model to its folder before any process starts; the
    # gateway does not fetch it (that is the engine's default_model module).
    from runtime.config import ClusterConfig, EngineConfig
    from runtime.tokenizer.server import run_gateway

    for model in (None, "SmolLM2-135M-Instruct"):
        with pytest.raises(ValueError, match="resolve_model"):
            run_gateway(ClusterConfig(engine=EngineConfig(model=model)))
