"""The `nnfabric` command: a researcher's view of the fabric.

nnfabric login --url http://host:8000 --api-key nnf_...   # writes ~/.config/nnfabric/config.toml
nnfabric models                                # state, replicas, queue depth, oldest wait
nnfabric jobs list | nnfabric jobs show <id> | nnfabric jobs cancel <id>

Running the fabric and its keys are operator commands: `nnfabric-server serve|keys`
(`pip install nnfabric-server`), which this client does not ship.
"""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.console import Console
from rich.table import Column, Table

app = typer.Typer(help="nnfabric: your jobs and models on a fabric", no_args_is_help=True)
jobs_app = typer.Typer(help="your jobs on the fabric", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
edits_app = typer.Typer(help="your persistent edits (model.edit()) on the fabric", no_args_is_help=True)
app.add_typer(edits_app, name="edits")
console = Console()


URL = typer.Option(None, envvar="NNFABRIC_URL", help="default: the config file")
API_KEY = typer.Option(None, envvar="NNFABRIC_API_KEY", help="default: the config file")


def _connect(url: str | None, api_key: str | None) -> Any:
    from .fabric import connect

    try:
        return connect(url, api_key, progress=False)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


@app.command()
def login(
    url: str = typer.Option(..., prompt=True, help="the fabric's api, e.g. http://127.0.0.1:8000"),
    api_key: str = typer.Option(..., prompt=True, hide_input=True, help="a key from your operator"),
) -> None:
    """Check the key against the fabric and save url and key to the config file."""
    from .errors import RemoteError
    from .remote.config import write_config
    from .remote.http import FabricClient

    try:
        FabricClient(url, api_key, progress=False).models()
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


@edits_app.command("list")
def edits_list(model: str, url: str = URL, api_key: str = API_KEY) -> None:
    """Your edits on MODEL, oldest first, with the lines that recorded them."""
    table = Table(Column("edit", no_wrap=True), "created", "nodes", "recorded at")
    for edit in _connect(url, api_key).edits(model):
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(edit["created"]))
        table.add_row(edit["id"], created, str(edit["nodes"]), "\n".join(edit["lines"][:5]))
    console.print(table)


@edits_app.command("rm")
def edits_remove(model: str, edit_id: str, url: str = URL, api_key: str = API_KEY) -> None:
    """Remove one of your edits on MODEL (jobs already queued keep theirs)."""
    from .errors import RemoteError

    try:
        _connect(url, api_key).remove_edit(model, edit_id)
    except RemoteError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(f"removed {edit_id}")


@app.command()
def models(url: str = URL, api_key: str = API_KEY) -> None:
    """Hosted models: state, replicas, queue depth, oldest wait."""
    table = Table("model", "state", "replicas", "queued", "oldest wait")
    for m in _connect(url, api_key).models():
        wait = "-" if m["oldest_wait_s"] is None else f"{m['oldest_wait_s']:.1f}s"
        table.add_row(m["name"], m["state"], f"{m['replicas']}/{m['replicas_wanted']}", str(m["queue_depth"]), wait)
    console.print(table)


@app.command(hidden=True, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve() -> None:
    """Moved: `nnfabric-server serve`."""
    _moved("serve")


@app.command(hidden=True, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def keys() -> None:
    """Moved: `nnfabric-server keys`."""
    _moved("keys")


def _moved(command: str) -> None:
    console.print(
        f"[red]`nnfabric {command}` is an operator command: run `nnfabric-server {command} ...` "
        "(install it with `pip install nnfabric-server`, or `make install` in a checkout)[/red]"
    )
    raise typer.Exit(2)


if __name__ == "__main__":
    app()
