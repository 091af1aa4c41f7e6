"""Import boundaries between the packages: the API side never loads torch, the engine's scheduling core and
config need no torch at all, and the engine never reaches into the web stack.

The import checks run in fresh interpreters: this one has long since imported torch for other tests.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import loraserve

PACKAGE = Path(loraserve.__file__).resolve().parent
TIMEOUT_S = 120

# Records the stack of the first import that reaches torch, so that a failure names the whole chain.
_TRACE_TORCH = """
import sys, traceback

class TorchTracer:
    def __init__(self):
        self.chain = []

    def find_spec(self, name, path=None, target=None):
        if (name == "torch" or name.startswith("torch.")) and not self.chain:
            self.chain = [f"{f.filename}:{f.lineno}: {f.line}" for f in traceback.extract_stack()[:-1]
                          if not f.filename.startswith("<frozen")]
        return None

tracer = TorchTracer()
sys.meta_path.insert(0, tracer)
"""

# Stands in for a machine without torch: any torch import fails as it would there.
_NO_TORCH = """
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by test_boundaries)", name=name)
        return None

assert "torch" not in sys.modules
sys.meta_path.insert(0, NoTorch())
"""


def _run_child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.parametrize(
    "statement",
    [
        "from loraserve.api import create_app",
        "import loraserve.registry",
        "import loraserve.client",
        "import loraserve.cli",
        "import loraserve.cli_accounts",
        "import loraserve.cli_serve",
        "import loraserve.cli_common",
        "import loraserve.catalog",
        "import loraserve.peft",
        # `loraserve loadtest` drives a server from a machine that need not have torch.
        "import loraserve.tools.loadtest.run",
        # with --engine-process the API process talks to the engine through this client and never loads torch
        "import loraserve.engine.core_process.client",
        "import loraserve.engine.core_process.supervisor",
    ],
)
def test_the_api_side_does_not_import_torch(statement: str) -> None:
    code = _TRACE_TORCH + textwrap.dedent(f"""
        {statement}
        if "torch" in sys.modules or tracer.chain:
            print("\\n".join(tracer.chain))
            raise SystemExit("torch was imported")
    """)
    done = _run_child(code)
    assert done.returncode == 0, f"{statement} imported torch (or failed):\n{done.stdout}{done.stderr}"


def _engine_modules_without_torch() -> list[str]:
    core = PACKAGE / "engine" / "core"
    names = [f"loraserve.engine.core.{m.name}" for m in pkgutil.iter_modules([str(core)])]
    return ["loraserve.engine.core", *sorted(names), "loraserve.engine.config"]


def test_the_engine_core_and_config_import_without_torch() -> None:
    # The scheduler, block manager and adapter slots are plain bookkeeping, testable without a model; the
    # config is what `loraserve serve` checks its options against before the slow torch import.
    modules = _engine_modules_without_torch()
    assert {"loraserve.engine.core.sequence", "loraserve.engine.core.block_manager",
            "loraserve.engine.core.scheduler", "loraserve.engine.core.adapter_slots"} <= set(modules)
    code = _NO_TORCH + "".join(f"import {m}\n" for m in modules)
    done = _run_child(code)
    assert done.returncode == 0, f"the engine core needs torch:\n{done.stderr}"


def _package_of(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])


def _imported_names(source: str, package: str) -> Iterator[tuple[int, str]]:
    """Every module an import statement in `source` may name, at any depth (functions, TYPE_CHECKING);
    `package` resolves relative imports."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:  # `from loraserve import api` imports a module too
                yield node.lineno, f"{module}.{alias.name}"


def _violations(folder: Path, forbidden: tuple[str, ...]) -> list[str]:
    files = sorted(folder.rglob("*.py"))
    assert files, f"no Python files under {folder}"
    return [
        f"{path.relative_to(PACKAGE.parent)}:{line}: imports {name}"
        for path in files
        for line, name in _imported_names(path.read_text(), _package_of(path))
        if any(name == root or name.startswith(root + ".") for root in forbidden)
    ]


def test_the_engine_never_imports_the_web_stack() -> None:
    assert _violations(PACKAGE / "engine", ("fastapi", "starlette", "loraserve.api")) == []


@pytest.mark.parametrize("package", ["api", "registry"])
def test_the_api_and_registry_never_import_torch(package: str) -> None:
    assert _violations(PACKAGE / package, ("torch",)) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import fastapi", "fastapi"),
        ("import starlette.requests as r", "starlette.requests"),
        ("from loraserve.api.app import create_app", "loraserve.api.app"),
        ("from loraserve import api", "loraserve.api"),
        ("from ... import api", "loraserve.api"),
        ("from ..api import app", "loraserve.engine.api"),
        ("def f() -> None:\n    from fastapi import FastAPI", "fastapi"),
        ("if TYPE_CHECKING:\n    import starlette", "starlette"),
    ],
)
def test_the_static_check_sees_every_spelling(source: str, expected: str) -> None:
    # The checks above pass vacuously if they miss a spelling of an import.
    assert expected in {name for _, name in _imported_names(source, "loraserve.engine.core")}
