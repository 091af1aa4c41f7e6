"""`loraserve token` (straight to the registry) and `loraserve finetune` (on a running server, as
wrangler's verbs): the account-side groups of the `loraserve` command (cli.py adds them to its app).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from loraserve.cli_common import (
    DEFAULT_DATA_DIR,
    AccountId,
    BaseUrl,
    DatabaseUrl,
    DataDir,
    Token,
    err,
    fail,
)
from loraserve.client import ASSET_FILES, DEFAULT_BASE_URL, APIError, Client

token_app = typer.Typer(no_args_is_help=True, help="API tokens (written straight to the registry).")
finetune_app = typer.Typer(no_args_is_help=True, help="LoRA finetunes on a running server.")


# tokens --------------------------------------------------------------------------------------------


@token_app.command("create")
def token_create(
    account: Annotated[str, typer.Option("--account", help="Account id (created if new).")],
    label: Annotated[str, typer.Option(help="A note to tell tokens apart.")] = "",
    data_dir: DataDir = DEFAULT_DATA_DIR,
    database_url: DatabaseUrl = None,
) -> None:
    """Create an API token; it is printed once, alone on the last line of stdout."""
    from loraserve.registry import Registry

    try:
        with Registry.open(data_dir, database_url) as registry:
            token = registry.create_token(account, label)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    err.print(f"token for account [bold]{account}[/] (shown once, keep it):", highlight=False)
    print(token)


@token_app.command("revoke")
def token_revoke(
    token: Annotated[str, typer.Argument(help="The token to revoke.")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    database_url: DatabaseUrl = None,
) -> None:
    """Revoke an API token."""
    from loraserve.registry import Registry

    with Registry.open(data_dir, database_url) as registry:
        revoked = registry.revoke_token(token)
    if not revoked:
        raise fail("no such live token")
    err.print("token revoked")


# finetunes -----------------------------------------------------------------------------------------


@finetune_app.command("create")
def finetune_create(
    model: Annotated[str, typer.Argument(help="The catalog model name.")],
    name: Annotated[str, typer.Argument(help="The finetune name.")],
    folder: Annotated[
        Path, typer.Argument(help="Folder holding adapter_config.json and adapter_model.safetensors.")
    ],
    account: AccountId,
    token: Token,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    description: Annotated[str, typer.Option(help="Free text.")] = "",
    public: Annotated[bool, typer.Option(help="Let every account use it.")] = False,
) -> None:
    """Create a finetune and upload its adapter files (as `wrangler ai finetune create`)."""
    paths = [folder / f for f in ASSET_FILES]
    if missing := [p.name for p in paths if not p.is_file()]:
        raise fail(f"asset missing in {folder}: {', '.join(missing)} (required: {', '.join(ASSET_FILES)})")
    with Client(account, token, base_url) as client, Progress(console=err, transient=True) as progress:
        try:
            err.print(f"creating finetune [bold]{name}[/] for model [bold]{model}[/] ...", highlight=False)
            finetune = client.new_finetune(model, name, description, public)
            task = progress.add_task("uploading", total=sum(p.stat().st_size for p in paths))
            for path in paths:
                progress.update(task, description=f"uploading {path.name}")
                client.upload_asset(finetune["id"], path)
                progress.advance(task, path.stat().st_size)
        except (APIError, OSError) as exc:
            raise fail(str(exc)) from None
    err.print(f"finetune [bold]{name}[/] ({finetune['id']}) is ready to use", highlight=False)
    print(finetune["id"])


@finetune_app.command("list")
def finetune_list(
    account: AccountId, token: Token, base_url: BaseUrl = DEFAULT_BASE_URL,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the account's finetunes."""
    with Client(account, token, base_url) as client:
        try:
            finetunes = client.list_finetunes()
        except APIError as exc:
            raise fail(str(exc)) from None
    if as_json:
        print(json.dumps(finetunes, indent=2))
        return
    if not sys.stdout.isatty():  # piped: one tab-separated line per finetune, never cut to a width
        for f in finetunes:
            print("\t".join([f["id"], f["name"], f["model"], f.get("description") or ""]))
        return
    table = Table()
    for column in ("finetune_id", "name", "model"):
        table.add_column(column, no_wrap=True)  # ids are copied from here: never cut them
    table.add_column("description", overflow="fold")
    for f in finetunes:
        table.add_row(f["id"], f["name"], f["model"], f.get("description") or "")
    Console().print(table)


@finetune_app.command("delete")
def finetune_delete(
    ref: Annotated[str, typer.Argument(help="Finetune id or name.")],
    account: AccountId, token: Token, base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """Delete a finetune and its files."""
    with Client(account, token, base_url) as client:
        try:
            finetune = client.delete_finetune(ref)
        except APIError as exc:
            raise fail(str(exc)) from None
    err.print(f"deleted finetune [bold]{finetune['name']}[/] ({finetune['id']})", highlight=False)
