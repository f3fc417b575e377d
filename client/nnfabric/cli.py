"""The `nnfabric` command: run the fabric and administer it.

nnfabric serve --catalog catalog.yaml          # Redis (unless NNFABRIC_REDIS_URL), Ray, workers, scheduler, api
nnfabric keys create alice --models gpt2       # prints the key once; only its hash is stored
nnfabric keys list | nnfabric keys revoke <key id>
nnfabric login --url http://host:8000 --api-key nnf_...   # writes ~/.config/nnfabric/config.toml
nnfabric models                                # state, replicas, queue depth, oldest wait
nnfabric jobs list | nnfabric jobs show <id> | nnfabric jobs cancel <id>
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import typer
from rich.console import Console
from rich.table import Column, Table

app = typer.Typer(help="nnfabric: run and administer the fabric", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (stored hashed in Redis)", no_args_is_help=True)
jobs_app = typer.Typer(help="your jobs on the fabric", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(jobs_app, name="jobs")
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


URL = typer.Option(None, envvar="NNFABRIC_URL", help="default: the config file")
API_KEY = typer.Option(None, envvar="NNFABRIC_API_KEY", help="default: the config file")


def _connect(url: str | None, api_key: str | None) -> Any:
    from .remote.client import connect

    try:
        return connect(url, api_key, progress=False)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


@app.command()
def login(
    url: str = typer.Option(..., prompt=True, help="the fabric's api, e.g. http://127.0.0.1:8000"),
    api_key: str = typer.Option(..., prompt=True, hide_input=True, help="a key from `nnfabric keys create`"),
) -> None:
    """Check the key against the fabric and save url and key to the config file."""
    from .errors import RemoteError
    from .remote.client import Session, write_config

    try:
        Session(url, api_key, progress=False).models()
    except (RemoteError, OSError) as exc:
        console.print(f"[red]login failed: {exc}[/red]")
        raise typer.Exit(1) from None
    path = write_config(url, api_key)
    console.print(f"logged in to {url}; saved to {path} (NNFABRIC_URL / NNFABRIC_API_KEY override it)")


@jobs_app.command("list")
def jobs_list(limit: int = typer.Option(20), url: str = URL, api_key: str = API_KEY) -> None:
    """Your recent jobs, newest first."""
    table = Table(Column("job", no_wrap=True, min_width=32), "model", "state", "kind", "created", "seconds", "error")
    for job in _connect(url, api_key).jobs(limit):
        ran = job.get("finished", 0) - job.get("started", job.get("finished", 0))
        table.add_row(
            job["id"],
            job["model"],
            job["state"],
            str(job.get("meta", {}).get("kind", "")),
            time.strftime("%H:%M:%S", time.localtime(job["created"])),
            f"{ran:.2f}" if "finished" in job else "-",
            (job.get("error") or "")[:60],
        )
    console.print(table)


@jobs_app.command("show")
def jobs_show(job_id: str, url: str = URL, api_key: str = API_KEY) -> None:
    """One job's record (state, queue position, times, error)."""
    console.print_json(data=_connect(url, api_key).status(job_id))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, url: str = URL, api_key: str = API_KEY) -> None:
    """Cancel a job that has not finished."""
    from .errors import RemoteError

    try:
        _connect(url, api_key).cancel(job_id)
    except RemoteError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(f"cancelled {job_id}")


@app.command()
def models(url: str = URL, api_key: str = API_KEY) -> None:
    """Hosted models: state, replicas, queue depth, oldest wait."""
    table = Table("model", "state", "replicas", "queued", "oldest wait")
    for m in _connect(url, api_key).models():
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
