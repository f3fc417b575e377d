"""What splitting a model into pipeline stages costs, measured in one run on one Ray node.

    python benchmarks/stages.py [--layers 8] [--width 256] [--runs 20]

Builds a GPT-2 (random weights, a tokenizer trained offline) and runs the same graphs on it:
in this process in one piece, as one stage actor (the whole model, one Ray hop per forward),
and as two stage actors (two hops, the graph's state travelling with the hidden state). Prints:

- the floor: one Ray actor call that carries nothing;
- the cost of one value crossing a stage: a value of N MB made on stage 0 and used on stage 1,
  against the same graph using it on stage 0 (ms, and ms per MB);
- a trace's and a 16-token generation's latency, staged against one stage.

Figures are p50 over --runs, with the machine's load average printed before and after: judge
the ratios (the machine is noisy), not the absolute times.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "The Eiffel Tower is in the city of Paris and the Colosseum is in the city of Rome."


def build(directory: Path, layers: int, width: int) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.support.models import train_tokenizer

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=8, vocab_size=300, n_positions=512,
                        pad_token_id=1, eos_token_id=2, bos_token_id=2)  # fmt: skip
    GPT2LMHeadModel(config).train(False).save_pretrained(directory)
    train_tokenizer(directory)


def p50(run: Callable[[], Any], runs: int) -> float:
    run()  # warm
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def staged_model(directory: Path, count: int) -> tuple[Any, list[Any]]:
    import nnfabric
    import ray

    from services.worker.pipeline.actors import RayLink, StageActor
    from services.worker.pipeline.links import Pipeline
    from services.worker.pipeline.plan import StagePlan
    from services.worker.pipeline.weights import shell_model

    model = nnfabric.LanguageModel(str(directory))
    shell = shell_model(str(directory))
    layers = len(shell.transformer.h)
    plan = StagePlan.balanced(shell, count) if count > 1 else StagePlan.of(shell, [(0, layers)])
    actors = [ray.remote(StageActor).options(num_cpus=0.1, max_concurrency=2).remote(  # type: ignore[attr-defined]
        str(directory), plan.to_json(), i, "float32") for i in range(plan.count)]  # fmt: skip
    ray.get([a.ping.remote() for a in actors])
    ray.get([later.connect.remote(earlier) for earlier, later in itertools.pairwise(actors)])
    model._adapter = Pipeline(shell, model.tokenizer, plan, [RayLink(a, i) for i, a in enumerate(actors)])
    return model, actors


def trace(model: Any) -> Any:
    with model.trace(PROMPT):
        out = model.lm_head.output.save()
    return out


def generate(model: Any) -> Any:
    with model.generate(PROMPT, max_new_tokens=16) as tracer:
        with tracer.all():
            model.transformer.h[1].output[:] = model.transformer.h[1].output * 1.01
        out = tracer.output.save()
    return out


def crossing(model: Any, megabytes: float, cross: bool) -> Callable[[], Any]:
    """A value of `megabytes` made from a stage-0 activation, used on stage 1 (cross) or on stage 0."""
    count = int(megabytes * (1 << 20) / 4)
    last = len(model.transformer.h) - 1

    def run() -> Any:
        with model.trace(PROMPT):
            made = model.transformer.h[0].output[0, 0, :1].repeat(count)  # made on stage 0, by the graph
            where = model.transformer.h[last if cross else 1]
            where.output[:] = where.output + made[0] * 0
            out = model.lm_head.output.save()
        return out

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    import nnfabric
    import ray

    folder = Path(tempfile.mkdtemp(prefix="nnf-stages-"))
    build(folder, args.layers, args.width)
    print(f"uptime: {os.getloadavg()[0]:.2f} (1-minute load average); GPT-2, {args.layers} layers, width {args.width}")
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=2)
    try:
        here = nnfabric.LanguageModel(str(folder))
        one, _ = staged_model(folder, 1)
        two, two_actors = staged_model(folder, 2)
        floor = p50(lambda: ray.get(two_actors[0].ping.remote()), args.runs * 5)
        print(f"floor: one Ray actor call carrying nothing: {floor:.2f} ms")
        print("one value crossing a stage (made on stage 0, used on stage 1, against used on stage 0):")
        for megabytes in (1, 16, 64):
            crossed = p50(crossing(two, megabytes, True), args.runs)
            stayed = p50(crossing(two, megabytes, False), args.runs)
            extra = crossed - stayed
            print(f"  {megabytes:3d} MB: {crossed:8.1f} ms against {stayed:8.1f} ms: +{extra:.1f} ms "
                  f"({extra / megabytes:.2f} ms per MB)")  # fmt: skip
        for label, run in (("trace", trace), ("generate, 16 tokens, an edit each step", generate)):
            local = p50(lambda run=run: run(here), args.runs)
            single = p50(lambda run=run: run(one), args.runs)
            staged = p50(lambda run=run: run(two), args.runs)
            print(f"{label}: in this process {local:.1f} ms; one stage actor {single:.1f} ms; two stages "
                  f"{staged:.1f} ms = {staged / single:.2f}x one stage ({(staged - single):.1f} ms for the "
                  f"second hop)")  # fmt: skip
    finally:
        ray.shutdown()
        print(f"uptime: {os.getloadavg()[0]:.2f} (1-minute load average)")


if __name__ == "__main__":
    main()
