"""The `nnfabric-server` command: run the fabric and administer its keys (operators only).

nnfabric-server serve --catalog catalog.yaml        # Redis (unless NNFABRIC_REDIS_URL), Ray, workers, scheduler, api
nnfabric-server keys create alice --models gpt2     # prints the key once; only its hash is stored
nnfabric-server keys list | nnfabric-server keys revoke <key id>

Researchers' commands (login, jobs, models) are the client's `nnfabric`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import typer
from rich.console import Console
from rich.table import Column, Table

from .common.settings import Settings
from .common.store import MAX_ACTIVE, MAX_STREAMS, ApiKey, Store

app = typer.Typer(help="nnfabric-server: run the fabric and administer it", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (stored hashed in Redis)", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
console = Console()
T = TypeVar("T")


def _with_store(action: Callable[[Store], Awaitable[T]]) -> T:
    async def go() -> T:
        store = Store.from_url(Settings().redis_url)
        try:
            return await action(store)
        finally:
            await store.close()

    return asyncio.run(go())


@keys_app.command("create")
def keys_create(
    user: str,
    models: str = typer.Option("*", help="comma-separated model names, or * for all"),
    max_active: int = typer.Option(MAX_ACTIVE, help="jobs queued or running at once"),
    max_streams: int = typer.Option(MAX_STREAMS, help="event websockets open at once"),
    rate_limit: int = typer.Option(0, help="job submissions a minute (0: no limit)"),
) -> None:
    """Create a key for USER; the key is shown once."""
    names = [m.strip() for m in models.split(",") if m.strip()]
    key, record = _with_store(lambda store: store.create_key(user, names, rate_limit, max_active, max_streams))
    rate = f"{rate_limit} jobs/min" if rate_limit else "no rate limit"
    console.print(f"key id {record.key_id} for {user} (models: {models}; {max_active} jobs at once; {rate})")
    typer.echo(key)


@keys_app.command("list")
def keys_list() -> None:
    """List keys (ids only; keys themselves are never stored)."""
    found: list[ApiKey] = _with_store(lambda store: store.list_keys())
    table = Table(Column("key id", no_wrap=True, min_width=12), "user", "models", "jobs at once", "streams",
                  "jobs/min", "created")  # fmt: skip
    for key in found:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(key.created))
        rate = str(key.rate_limit) if key.rate_limit else "-"
        table.add_row(key.key_id, key.user, ",".join(key.models), str(key.max_active), str(key.max_streams), rate,
                      created)  # fmt: skip
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id."""
    if not _with_store(lambda store: store.revoke_key(key_id)):
        console.print(f"[red]no key with id {key_id}[/red]")
        raise typer.Exit(1)
    console.print(f"revoked {key_id}")


@app.command()
def serve(
    catalog: str = typer.Option(..., help="the model catalog (YAML)"),
    port: int = typer.Option(8000, help="api port on 127.0.0.1"),
) -> None:
    """Run the whole fabric on this machine until interrupted."""
    from .launcher import EmbeddedFabric

    with console.status("starting Redis, Ray and the model replicas (loading weights)..."):
        fabric = EmbeddedFabric.start(catalog, redis_url=os.environ.get("NNFABRIC_REDIS_URL"), port=port)
        fabric.wait_ready()
    console.print(f"nnfabric is serving {', '.join(fabric.deployed)} at {fabric.url}  (Ctrl-C stops)")
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        while not stop["now"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        fabric.stop()


if __name__ == "__main__":
    app()
