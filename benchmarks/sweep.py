"""A sweep through the fabric, against the replica's executor alone on the same jobs.

    python benchmarks/sweep.py [--layers 8] [--positions 128] [--width 256] [--max-batch 16]

Activation patching at every layer x every position of a small random GPT-2 (8 x 128 = 1,024
jobs by default): each job zeroes one layer's output at one position and saves the last
position's logits. The same jobs run

1. in this process through the replica's executor (services.worker.executor), in batches of
   --max-batch, as a replica runs them: no api, Redis, scheduler or Serve;
2. as one `model.sweep(remote=True)` from one client process through the real stack on this
   machine (the api, Redis, the scheduler, one Ray Serve replica with the same max_batch).

Prints both wall times, their ratio (the goal: at most 1.5), the client's CPU time, `uptime`
before and after, and checks that the fabric's logits equal the executor's for a sample.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository: tests.support, services

import nnfabric  # noqa: E402
from nnfabric.runtime.wire import pack_job, unpack_values  # noqa: E402

from services.common.catalog import ModelLimits, ModelSpec  # noqa: E402
from services.launcher import EmbeddedFabric  # noqa: E402
from services.worker.executor import BatchExecutor  # noqa: E402
from tests.support.keys import new_key  # noqa: E402
from tests.support.models import build_gpt2  # noqa: E402

GOAL = 1.5


def record_sweep(model: nnfabric.LanguageModel, prompt: list[int], layers: int) -> list[Any]:
    """The sweep as a researcher writes it; returns each job's saved logits proxy."""
    saved = []
    for layer in range(layers):
        for position in range(len(prompt)):
            with model.trace(prompt):
                model.transformer.h[layer].output[:, position] = 0
                saved.append(model.lm_head.output[:, -1].save())
    return saved


class _Capture:
    """A backend that keeps a sweep's envelopes instead of running them."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def run_many(self, requests: list[Any], ended: Any) -> list[None]:
        self.bodies = [pack_job(r.graphs, r.tensors, r.session, {"model": "sweep"}) for r in requests]
        return [None] * len(requests)


def envelopes(model: nnfabric.LanguageModel, prompt: list[int], layers: int) -> list[bytes]:
    capture = _Capture()
    original = model.backend
    model.backend = lambda remote: capture  # type: ignore[assignment,method-assign,return-value]
    try:
        with model.sweep(remote=True, progress=False):
            record_sweep(model, prompt, layers)
    finally:
        model.backend = original  # type: ignore[method-assign]
    return capture.bodies


def executor_alone(model_dir: Path, bodies: list[bytes], max_batch: int) -> tuple[float, list[torch.Tensor]]:
    model = nnfabric.LanguageModel(str(model_dir))
    spec = ModelSpec(name="sweep", source=str(model_dir), limits=ModelLimits(max_batch=max_batch, timeout_s=3600))  # type: ignore[call-arg]
    executor = BatchExecutor(spec, model._module, model.tokenizer)
    jobs = [(f"{i:032x}", body) for i, body in enumerate(bodies)]
    executor.run(jobs[:max_batch])  # warm
    values: list[torch.Tensor] = []
    start = time.perf_counter()
    for first in range(0, len(jobs), max_batch):
        outcomes = executor.run(jobs[first : first + max_batch])
        for job_id, _ in jobs[first : first + max_batch]:
            outcome = outcomes[job_id]
            assert outcome.ok, outcome.error
            (value,) = unpack_values(outcome.result).values()
            values.append(value)
    return time.perf_counter() - start, values


def client_main(url: str, key: str, model_dir: str, positions: int, layers: int) -> None:
    """One researcher: the sweep over the fabric, in a process of its own. Prints one JSON line."""
    nnfabric.connect(url, key, progress=False)
    model = nnfabric.LanguageModel(model_dir, remote_name="sweep")
    prompt = _prompt(positions)
    with model.sweep(remote=True, progress=False):  # warm: the connection, the replica
        record_sweep(model, prompt[:4], 1)
    cpu = psutil.Process().cpu_times()
    start = time.perf_counter()
    with model.sweep(remote=True, progress=False) as sweep:
        saved = record_sweep(model, prompt, layers)
    wall = time.perf_counter() - start
    after = psutil.Process().cpu_times()
    assert not sweep.failed, sweep.failed[:3]
    sample = {str(i): saved[i].value.tolist() for i in range(0, len(saved), max(1, len(saved) // 16))}
    print(json.dumps({"wall": wall, "cpu": after.user + after.system - cpu.user - cpu.system, "sample": sample}))


def _prompt(positions: int) -> list[int]:
    return torch.randint(3, 300, (positions,), generator=torch.Generator().manual_seed(0)).tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--positions", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--cpus", type=float, default=float(torch.get_num_threads()),
                        help="the replica's CPUs (Ray gives its torch as many threads); the executor's: all")  # fmt: skip
    parser.add_argument("--client", nargs=3, metavar=("URL", "KEY", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(*args.client, args.positions, args.layers)
        return
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    print(f"uptime before: {uptime()}")
    jobs = args.layers * args.positions
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp, "small")
        build_gpt2(model_dir, layers=args.layers, width=args.width)
        bodies = envelopes(nnfabric.LanguageModel(str(model_dir)), _prompt(args.positions), args.layers)
        alone_s, alone = executor_alone(model_dir, bodies, args.max_batch)
        print(f"executor alone, in process: {jobs} jobs in {alone_s:.2f} s ({alone_s / jobs * 1e3:.2f} ms/job)")
        catalog = Path(tmp, "catalog.yaml")
        catalog.write_text(yaml.safe_dump({"models": [{"name": "sweep", "source": str(model_dir),
                                                        "cpus": args.cpus, "limits": {"max_batch": args.max_batch}}]}))  # fmt: skip
        fabric = EmbeddedFabric.start(catalog, redis_data_dir=str(Path(tmp, "redis")))
        try:
            fabric.wait_ready()
            key = new_key(fabric.settings.redis_url, "sweeper")
            command = [sys.executable, __file__, "--layers", str(args.layers), "--positions", str(args.positions),
                       "--client", fabric.url, key, str(model_dir)]  # fmt: skip
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        finally:
            fabric.stop()
    client = json.loads(out.strip().splitlines()[-1])
    for index, value in client["sample"].items():
        expected = alone[int(index)]
        assert torch.allclose(torch.tensor(value), expected, atol=1e-4), f"job {index} differs from the executor's"
    ratio = client["wall"] / alone_s
    print(f"the fabric, one sweep:      {jobs} jobs in {client['wall']:.2f} s ({client['wall'] / jobs * 1e3:.2f} ms/job);"
          f" client CPU {client['cpu'] / jobs * 1e3:.2f} ms/job")  # fmt: skip
    print(f"fabric / executor alone: {ratio:.2f}x (goal <= {GOAL}); sampled results equal the executor's")
    print(f"uptime after: {uptime()}")


if __name__ == "__main__":
    main()
