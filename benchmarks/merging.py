"""Merging for real traffic: prompts of mixed lengths in one forward pass, and generations of
mixed lengths arriving over time in one continuously batched generation.

    python benchmarks/merging.py [--traces-only] [--jobs 64] [--clients 16] [--rate 40] [--max-batch 16]

1. Traces, in this process, on the replica's executor (services.worker.executor): 32 patching
   jobs whose prompts have 12 different lengths, against the same 32 jobs with prompts of one
   length (the longest; and the mean, the same number of tokens), and against the way before
   (one forward pass per length). Forward passes and the median CPU time of 5 runs each.
2. Generations, through the real stack on this machine (api, Redis, scheduler, one Ray Serve
   replica): --jobs generate jobs with prompts of 4-40 tokens and 4-32 new tokens, arriving as
   a Poisson process (--rate jobs/s in all) from --clients client threads. Run twice, each on a
   fresh fabric: continuous batching on (now) and off (NNFABRIC_CONTINUOUS_BATCHING=0: the code
   before, one `generate` per batch and prompt length). Tokens per second over the whole run and
   p50/p95 latency (submit to result). Then one plain batched Hugging Face `generate` of the same
   prompts in this process (left-padded, the longest max_new_tokens for all), its tokens/s
   counting each job's own tokens.

`uptime` is printed before and after; compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository: tests.support, services

import nnfabric  # noqa: E402
from nnfabric.graph import Graph, Invoke, Node, Ref  # noqa: E402
from nnfabric.remote.http import FabricClient  # noqa: E402
from nnfabric.runtime.wire import pack_request, unpack_result  # noqa: E402

from services.common.catalog import ModelLimits, ModelSpec  # noqa: E402
from services.common.settings import Settings  # noqa: E402
from services.launcher import EmbeddedFabric  # noqa: E402
from services.worker.executor import BatchExecutor  # noqa: E402
from tests.support.keys import new_key  # noqa: E402
from tests.support.models import build_gpt2  # noqa: E402

TRACE_GOAL = 1.2
GENERATE_GOAL = 4.0


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def patch_job(ids: list[int], layer: int, model: str | None = None) -> bytes:
    """Zero one layer's output at the prompt's first token; save the last token's logits."""
    g = Graph()
    g.invokes.append(Invoke(args=[ids]))
    h = g.add(Node("output", [f"transformer.h.{layer}", 0, 0]))
    g.add(Node("setitem", [Ref(h.id), (slice(None), 0), 0.0]))
    final = g.add(Node("output", ["", 0, 0]))
    logits = g.add(Node("getattr", [Ref(final.id), "logits"]))
    g.saves.append(g.add(Node("getitem", [Ref(logits.id), (slice(None), -1)])).id)
    return pack_request(g, {}, extra={"model": model} if model else None)


def generate_job(ids: list[int], new: int, model: str) -> bytes:
    g = Graph(kind="generate", options={"max_new_tokens": new})
    g.invokes.append(Invoke(args=[ids]))
    g.saves.append(g.add(Node("model_output", [])).id)
    return pack_request(g, {}, extra={"model": model})


def timed(run: Any, repeats: int = 5) -> float:
    """The median CPU time of `run()` in this process (torch on one thread: steadier than wall
    time on a busy machine)."""
    found = []
    for _ in range(repeats):
        start = time.process_time()
        run()
        found.append(time.process_time() - start)
    return statistics.median(found)


def traces(model_dir: Path, rng: random.Random) -> None:
    lm = nnfabric.LanguageModel(str(model_dir))
    hf = lm._module
    ex = BatchExecutor(ModelSpec(name="b", source="x", limits=ModelLimits(max_batch=32)), hf, lm.tokenizer)
    lengths = [8 + 4 * (i % 12) for i in range(32)]  # 12 lengths, 8..52 tokens
    mixed = [[rng.randrange(3, 290) for _ in range(n)] for n in lengths]
    longest = [ids + [rng.randrange(3, 290) for _ in range(max(lengths) - len(ids))] for ids in mixed]
    mean = round(sum(lengths) / len(lengths))
    even = [(ids * 8)[:mean] for ids in mixed]
    sets = {name: [(str(i), patch_job(ids, i % 2)) for i, ids in enumerate(prompts)]
            for name, prompts in (("mixed", mixed), ("longest", longest), ("mean", even))}  # fmt: skip
    passes: list[int] = []
    handle = hf.register_forward_pre_hook(lambda m, a: passes.append(1))
    try:
        ex.run(sets["mixed"])
        merged_passes = len(passes)
        by_length: dict[int, list[tuple[str, bytes]]] = {}
        for job, n in zip(sets["mixed"], lengths, strict=True):
            by_length.setdefault(n, []).append(job)
        times = {name: timed(lambda jobs=jobs: ex.run(jobs)) for name, jobs in sets.items()}
        times["before: one pass per length"] = timed(lambda: [ex.run(jobs) for jobs in by_length.values()])
    finally:
        handle.remove()
    print(f"32 traces, prompts of 12 lengths (8-52 tokens): {merged_passes} forward pass(es) "
          f"(before: {len(by_length)})")  # fmt: skip
    for name, seconds in times.items():
        print(f"  {name:<30} {seconds * 1e3:8.1f} ms")
    print(f"  mixed / one length (longest): {times['mixed'] / times['longest']:.2f}x (goal <= {TRACE_GOAL}); "
          f"mixed / one length (mean, same tokens): {times['mixed'] / times['mean']:.2f}x; "
          f"before / mixed: {times['before: one pass per length'] / times['mixed']:.2f}x")  # fmt: skip


def workload(jobs: int, clients: int, rate: float, rng: random.Random) -> list[tuple[int, float, list[int], int]]:
    """(client, arrival time, prompt ids, max_new_tokens) per job: a Poisson process of `rate`."""
    found, now = [], 0.0
    for index in range(jobs):
        now += rng.expovariate(rate)
        found.append((index % clients, now, [rng.randrange(3, 290) for _ in range(rng.randint(4, 40))],
                      rng.randint(4, 32)))  # fmt: skip
    return found


def in_process(model_dir: Path, work: list[Any], continuous: bool, batch: int) -> float:
    """CPU seconds of the replica's executor alone on the same jobs, in batches of `batch` in
    their order of arrival (no api, Redis, scheduler, Serve, nor joining between batches)."""
    lm = nnfabric.LanguageModel(str(model_dir))
    limits = ModelLimits(max_batch=batch)
    ex = BatchExecutor(ModelSpec(name="gen", source="x", limits=limits), lm._module, lm.tokenizer,
                       Settings(continuous_batching=continuous))  # fmt: skip
    jobs = [(str(i), generate_job(ids, new, "gen")) for i, (_, _, ids, new) in enumerate(work)]
    return timed(lambda: [ex.run(jobs[k : k + batch]) for k in range(0, len(jobs), batch)], repeats=3)


def through_the_fabric(
    model_dir: Path, work: list[Any], continuous: bool, clients: int, batch: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Path(tmp, "catalog.yaml")
        catalog.write_text(yaml.safe_dump({"models": [{"name": "gen", "source": str(model_dir), "cpus": 1,
                                                        "limits": {"max_batch": batch}}]}))  # fmt: skip
        os.environ["NNFABRIC_CONTINUOUS_BATCHING"] = "1" if continuous else "0"
        fabric = EmbeddedFabric.start(catalog, redis_data_dir=str(Path(tmp, "redis")))
        try:
            fabric.wait_ready()
            keys = [new_key(fabric.settings.redis_url, f"client{i}") for i in range(clients)]  # a user each
            warm = FabricClient(fabric.url, keys[0], progress=False)
            _wait(warm, warm.submit(generate_job([5, 6, 7], 2, "gen"))["id"])
            latencies: list[float] = []
            tokens = [0]
            lock = threading.Lock()
            failures: list[BaseException] = []
            start = time.monotonic() + 0.5

            def client(index: int) -> None:
                mine = [job for job in work if job[0] == index]
                pending: list[tuple[str, float]] = []
                fabric_client = FabricClient(fabric.url, keys[index], progress=False)
                try:
                    for _, at, ids, new in mine:
                        time.sleep(max(0.0, start + at - time.monotonic()))  # the job's arrival (the workload's clock)
                        pending.append((fabric_client.submit(generate_job(ids, new, "gen"))["id"], time.monotonic()))
                    for job_id, sent in pending:
                        made = _wait(fabric_client, job_id)
                        with lock:
                            latencies.append(made[1] - sent)
                            tokens[0] += made[0]
                except BaseException as exc:  # reported after the run, not lost in a thread
                    failures.append(exc)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.monotonic() - start
            if failures:
                raise RuntimeError(f"{len(failures)} client(s) failed; the first: {failures[0]!r}")
        finally:
            fabric.stop()
    latencies.sort()
    return {"wall": wall, "tokens": tokens[0], "p50": statistics.median(latencies),
            "p95": latencies[int(0.95 * (len(latencies) - 1))]}  # fmt: skip


def _wait(client: FabricClient, job_id: str) -> tuple[int, float]:
    """Follow a job to its end (its event stream); its ids' length and when it ended. A job that
    completed late is noticed late by a client busy with an earlier one: the end is read from
    the job's own record (`finished`), on the fabric's clock, converted to ours."""
    final = client.wait(job_id, timeout=600)
    if final["type"] != "completed":
        raise RuntimeError(f"job {job_id} {final['type']}: {final.get('message')}")
    record = client.status(job_id)
    ended = time.monotonic() - (time.time() - float(record["finished"]))
    (ids,) = unpack_result(client.result(job_id)).values()
    return int(ids.shape[1]), ended


def plain_generate(model_dir: Path, work: list[Any]) -> tuple[float, int]:
    lm = nnfabric.LanguageModel(str(model_dir))
    hf, pad = lm._module, lm.tokenizer.pad_token_id or 0
    width = max(len(ids) for _, _, ids, _ in work)
    ids = torch.tensor([[pad] * (width - len(p)) + p for _, _, p, _ in work])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for _, _, p, _ in work])
    start = time.perf_counter()
    with torch.no_grad():
        hf.generate(ids, attention_mask=mask, max_new_tokens=max(n for *_, n in work), do_sample=False, pad_token_id=pad)
    return time.perf_counter() - start, sum(n for *_, n in work)


def hf_continuous(model_dir: Path, work: list[Any]) -> tuple[float, int] | str:
    """Hugging Face's own continuous batching (`generate_batch`, a paged cache and paged eager
    attention) on the same prompts, in process: CPU seconds and new tokens (the longest
    max_new_tokens for all: one generation config serves every request), or why it could not run."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="paged|eager").eval()
        longest = max(n for *_, n in work)
        config = GenerationConfig(max_new_tokens=longest, do_sample=False, eos_token_id=-1, pad_token_id=1,
                                  num_blocks=256, block_size=32, max_batch_tokens=512)  # fmt: skip
        start = time.process_time()
        model.generate_batch(inputs=[ids for _, _, ids, _ in work], generation_config=config, warmup=False)
        return time.process_time() - start, longest * len(work)
    except Exception as exc:  # an API that moves between transformers releases
        return f"{type(exc).__name__}: {exc}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--traces-only", action="store_true")
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rate", type=float, default=40.0, help="jobs per second, all clients together")
    parser.add_argument("--max-batch", type=int, default=16, help="the model's max_batch (jobs in one generation)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    print(f"uptime before: {uptime()}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp, "gpt2")
        build_gpt2(model_dir, layers=args.layers, width=args.width)
        traces(model_dir, rng)
        if not args.traces_only:
            work = workload(args.jobs, args.clients, args.rate, rng)
            made = sum(n for *_, n in work)
            alone = {on: in_process(model_dir, work, on, args.max_batch) for on in (True, False)}
            print(f"{args.jobs} generate jobs on the executor alone, in batches of {args.max_batch}: continuous "
                  f"{made / alone[True]:.0f} new tokens/s of CPU, before {made / alone[False]:.0f}: "
                  f"{alone[False] / alone[True]:.2f}x")  # fmt: skip
            found = {name: through_the_fabric(model_dir, work, on, args.clients, args.max_batch)
                     for name, on in (("continuous batching", True), ("before (one generate per batch and length)", False))}  # fmt: skip
            plain_s, plain_tokens = plain_generate(model_dir, work)
            paged = hf_continuous(model_dir, work)
            print(f"{args.jobs} generate jobs, prompts 4-40 tokens, 4-32 new tokens, Poisson {args.rate:g} jobs/s "
                  f"from {args.clients} clients:")  # fmt: skip
            for name, result in found.items():
                print(f"  {name:<44} {made / result['wall']:7.1f} new tokens/s over {result['wall']:.1f} s; "
                      f"latency p50 {result['p50']:.2f} s, p95 {result['p95']:.2f} s")  # fmt: skip
            if isinstance(paged, str):
                print(f"  Hugging Face generate_batch (paged): could not run: {paged}")
            else:
                print(f"  Hugging Face generate_batch (paged cache), in process, all at once: {paged[1] / paged[0]:7.1f} "
                      f"new tokens/s of CPU ({paged[0]:.2f} s)")  # fmt: skip
            now, before = found["continuous batching"], found["before (one generate per batch and length)"]
            print(f"  plain batched HF generate, in process, all at once: {plain_tokens / plain_s:7.1f} new tokens/s "
                  f"({plain_s:.2f} s; no arrivals, no interventions, no isolation)")  # fmt: skip
            print(f"  continuous / before: {before['wall'] / now['wall']:.2f}x tokens/s (goal >= {GENERATE_GOAL}); "
                  f"p50 {before['p50'] / now['p50']:.2f}x, p95 {before['p95'] / now['p95']:.2f}x lower")  # fmt: skip
    print(f"uptime after: {uptime()}")


if __name__ == "__main__":
    main()
