"""Tokens as they are made: time to the first token and tokens per second, streamed and not.

    python benchmarks/streaming.py [--tokens 64] [--runs 5]

Through the real stack on this machine (api, Redis, scheduler, one Ray Serve replica) with a
small random GPT-2, one generation of --tokens new tokens at a time, --runs times each way:

- the Python client: `model.generate(..., remote=True, blocking=False, stream=True)` and
  `tracer.job.tokens()`, against the same job waited for whole (`stream=False`);
- the OpenAI-compatible route with the `openai` package, `stream=True` against not.

Time to first token: from the call to the first token in hand (not streamed: the whole
answer). Tokens per second: new tokens over the time to the last one. Medians; `uptime` before
and after.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository: tests.support, services

import nnfabric  # noqa: E402

from services.launcher import EmbeddedFabric  # noqa: E402
from tests.support.keys import new_key  # noqa: E402
from tests.support.models import build_gpt2  # noqa: E402

PROMPT = "The Eiffel Tower is in the city of"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def python_client(model: nnfabric.LanguageModel, tokens: int, stream: bool) -> tuple[float, float]:
    start = time.perf_counter()
    first = None
    with model.generate(PROMPT, max_new_tokens=tokens, remote=True, blocking=False, stream=stream) as tracer:
        tracer.output.save()
    if stream:
        for _ in tracer.job.tokens(timeout=300):
            first = first or time.perf_counter()
    else:
        tracer.job.wait(timeout=300)
    end = time.perf_counter()
    return (first or end) - start, end - start


def openai_client(client: object, tokens: int, stream: bool) -> tuple[float, float]:
    start = time.perf_counter()
    first = None
    reply = client.completions.create(model="gpt", prompt=PROMPT, max_tokens=tokens, temperature=0,  # type: ignore[attr-defined]
                                      stream=stream)  # fmt: skip
    if stream:
        for chunk in reply:
            if chunk.choices[0].text:
                first = first or time.perf_counter()
    end = time.perf_counter()
    return (first or end) - start, end - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"uptime before: {uptime()}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp, "gpt2")
        build_gpt2(model_dir, layers=4, width=128)
        catalog = Path(tmp, "catalog.yaml")
        catalog.write_text(yaml.safe_dump({"models": [{"name": "gpt", "source": str(model_dir), "cpus": 1}]}))
        fabric = EmbeddedFabric.start(catalog, redis_data_dir=str(Path(tmp, "redis")))
        try:
            fabric.wait_ready()
            key = new_key(fabric.settings.redis_url, "bench")
            nnfabric.connect(fabric.url, key, progress=False)
            model = nnfabric.LanguageModel(str(model_dir), remote_name="gpt")
            from openai import OpenAI

            client = OpenAI(base_url=f"{fabric.url}/v1", api_key=key, max_retries=0, timeout=300)
            python_client(model, 4, True)  # warm: the connection, the replica
            for name, run in (("Python client", lambda s: python_client(model, args.tokens, s)),
                              ("OpenAI route", lambda s: openai_client(client, args.tokens, s))):  # fmt: skip
                for stream in (True, False):
                    found = [run(stream) for _ in range(args.runs)]
                    ttft = statistics.median(f for f, _ in found)
                    total = statistics.median(t for _, t in found)
                    print(f"{name:<14} {'streamed' if stream else 'whole':<9} time to first token {ttft * 1e3:7.1f} ms, "
                          f"{args.tokens / total:6.1f} tokens/s ({total * 1e3:.0f} ms for {args.tokens})")  # fmt: skip
        finally:
            fabric.stop()
    print(f"uptime after: {uptime()}")


if __name__ == "__main__":
    main()
