"""`loraserve serve --replicas N [--address ADDR]`: options that cannot work together are refused before
anything starts (the running application is tested in test_cluster_serve.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraserve.cli import app

runner = CliRunner()


@pytest.mark.parametrize(("options", "message"), [
    (("--address", "127.0.0.1:6379"), "--address needs --replicas"),
    (("--replicas", "2", "--engine-process"), "--engine-process and --replicas do not mix"),
    (("--replicas", "2", "--engine-nice", "3"), "--engine-nice is for engine processes on one machine"),
    (("--in-process", "--engine-nice", "3"), "--engine-nice needs the engine process"),
])
def test_serve_refuses_options_that_do_not_mix(tmp_path: Path, options: tuple[str, ...],
                                               message: str) -> None:
    done = runner.invoke(app, ["serve", "--data-dir", str(tmp_path), "--model", "@cf/test/tiny=random:tiny",
                               *options])
    assert done.exit_code == 2, done.output
    assert message in " ".join(done.output.split())


def test_serve_refuses_zero_replicas(tmp_path: Path) -> None:
    done = runner.invoke(app, ["serve", "--data-dir", str(tmp_path), "--replicas", "0"])
    assert done.exit_code == 2 and "--replicas" in done.output
