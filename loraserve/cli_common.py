"""What the `loraserve` command's modules share (cli.py, cli_accounts.py): the stderr console, the error
exit, and the options several commands take. Torch-free, as every CLI module at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

err = Console(stderr=True, soft_wrap=True)

DEFAULT_DATA_DIR = Path("data")
DataDir = Annotated[
    Path, typer.Option("--data-dir", envvar="LORASERVE_DATA_DIR", help="Registry database and adapter files.")
]
DatabaseUrl = Annotated[
    str | None, typer.Option("--database-url", help="SQLAlchemy URL; default: SQLite in the data dir.")
]
BaseUrl = Annotated[
    str, typer.Option("--base-url", envvar="LORASERVE_BASE_URL", help="The server's root URL.")
]
AccountId = Annotated[str, typer.Option("--account", envvar="LORASERVE_ACCOUNT_ID", help="Account id.")]
Token = Annotated[str, typer.Option("--token", envvar="LORASERVE_TOKEN", help="API token of the account.")]


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)
