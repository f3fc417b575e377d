"""The `nnfabric` command: run the fabric and administer it.

nnfabric serve --catalog catalog.yaml          # Redis (unless NNFABRIC_REDIS_URL), Ray, workers, scheduler, api
nnfabric keys create alice --models gpt2       # prints the key once; only its hash is stored
nnfabric keys list | nnfabric keys revoke <key id>
nnfabric models                                # state, replicas, queue depth (NNFABRIC_URL/_API_KEY)
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="nnfabric: run and administer the fabric", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (stored hashed in Redis)", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
console = Console()


def _store() -> Any:
    from redis.asyncio import Redis

    from services.common.settings import Settings
    from services.common.store import Store

    return Store(Redis.from_url(Settings().redis_url))


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


@keys_app.command("create")
def keys_create(
    user: str,
    models: str = typer.Option("*", help="comma-separated model names, or * for all"),
    rate_limit: int = typer.Option(60, help="requests per minute"),
) -> None:
    """Create a key for USER; the key is shown once."""

    async def go() -> Any:
        store = _store()
        try:
            return await store.create_key(user, [m.strip() for m in models.split(",") if m.strip()], rate_limit)
        finally:
            await store.redis.aclose()

    key, record = _run(go())
    console.print(f"key id {record.key_id} for {user} (models: {models}, {rate_limit}/min)")
    typer.echo(key)


@keys_app.command("list")
def keys_list() -> None:
    """List keys (ids only; keys themselves are never stored)."""

    async def go() -> Any:
        store = _store()
        try:
            return await store.list_keys()
        finally:
            await store.redis.aclose()

    table = Table("key id", "user", "models", "rate/min", "created")
    for key in _run(go()):
        table.add_row(
            key.key_id,
            key.user,
            ",".join(key.models),
            str(key.rate_limit),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(key.created)),
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id."""

    async def go() -> bool:
        store = _store()
        try:
            revoked: bool = await store.revoke_key(key_id)
            return revoked
        finally:
            await store.redis.aclose()

    if not _run(go()):
        console.print(f"[red]no key with id {key_id}[/red]")
        raise typer.Exit(1)
    console.print(f"revoked {key_id}")


@app.command()
def models(
    url: str = typer.Option(None, envvar="NNFABRIC_URL"), api_key: str = typer.Option(None, envvar="NNFABRIC_API_KEY")
) -> None:
    """Hosted models: state, replicas, queue depth, oldest wait."""
    from .remote.client import connect

    table = Table("model", "state", "replicas", "queued", "oldest wait")
    for m in connect(url, api_key, progress=False).models():
        wait = "-" if m["oldest_wait_s"] is None else f"{m['oldest_wait_s']:.1f}s"
        table.add_row(m["name"], m["state"], f"{m['replicas']}/{m['replicas_wanted']}", str(m["queue_depth"]), wait)
    console.print(table)


@app.command()
def serve(
    catalog: str = typer.Option(..., help="the model catalog (YAML)"),
    port: int = typer.Option(8000, help="api port on 127.0.0.1"),
) -> None:
    """Run the whole fabric on this machine until interrupted."""
    from services.launcher import EmbeddedFabric

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
