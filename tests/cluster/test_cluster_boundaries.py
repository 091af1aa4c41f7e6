"""Only the engine replicas load torch: the gateway's modules, the application builder and `serve
--replicas` import (and build the application) on a machine without it. Checked in a fresh interpreter
where any torch import fails, as it would there."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'loraserve[cluster]'")

_NO_TORCH = """
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, NoTorch())
"""


def test_the_gateway_side_builds_the_application_without_torch() -> None:
    code = _NO_TORCH + textwrap.dedent("""
        import loraserve.cluster.gateway, loraserve.cluster.local
        from loraserve.cluster.app import build_app

        app = build_app({"models": "@cf/test/tiny=random:tiny", "replicas": "2"})
        print(type(app).__name__)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["Application"]
