"""Tracing overhead against the plain model, measured in one process (ratios, not seconds).

    python benchmarks/overhead.py [--repeats 30]

Prints, for each task, our median time / the plain model's median time, and where nnsight
(0.8.1, the `bench` extra) is installed, our time / its time for the same task.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.support

import nnfabric

from tests.support.models import build_gpt2, train_tokenizer

torch.set_num_threads(max(1, torch.get_num_threads()))


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Alternate the candidates so drift on a noisy machine hits them alike."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def small_model(directory: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=12, n_embd=768, n_head=12, vocab_size=300, n_positions=128, pad_token_id=1, eos_token_id=2
    )
    GPT2LMHeadModel(config).train(False).save_pretrained(directory)
    train_tokenizer(directory)


def tasks(
    model: nnfabric.LanguageModel, ids: torch.Tensor, ids2: torch.Tensor
) -> dict[str, dict[str, Callable[[], object]]]:
    hf = model._module
    blocks = model.transformer.h
    pad = model.tokenizer.pad_token_id

    def plain() -> object:
        with torch.no_grad():
            return hf(ids)

    def plain_batch2() -> object:
        with torch.no_grad():
            return hf(torch.cat([ids, ids2]))

    def one_save() -> object:
        with model.trace(ids):
            out = blocks[len(blocks) // 2].output.save()
        return out

    def all_saves() -> object:
        with model.trace(ids):
            outs = [b.output.save() for b in blocks]
        return outs

    def patching() -> object:
        with model.trace() as tracer:
            with tracer.invoke(ids):
                clean = blocks[len(blocks) // 2].output[:, -1].save()
            with tracer.invoke(ids2):
                blocks[len(blocks) // 2].output[:, -1] = clean
                logits = model.output.logits.save()
        return logits

    def plain_generate() -> object:
        with torch.no_grad():
            return hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=pad
            )

    def generate_edit() -> object:
        with model.generate(ids, max_new_tokens=5) as tracer:
            with tracer.iter[2]:
                blocks[0].output[:, -1] = 0
            out = tracer.output.save()
        return out

    def save_and_zero() -> object:
        with model.trace(ids):
            out = blocks[0].output.save()
            blocks[-1].mlp.output = blocks[-1].mlp.output * 0
        return out

    return {
        "a": {"label": "trace, 1 save", "base": plain, "ours": one_save},  # type: ignore[dict-item]
        "b": {"label": "trace, every block saved", "base": plain, "ours": all_saves},  # type: ignore[dict-item]
        "c": {"label": "patching across 2 invokes", "base": plain_batch2, "ours": patching},  # type: ignore[dict-item]
        "d": {"label": "generate 5, one step edited", "base": plain_generate, "ours": generate_edit},  # type: ignore[dict-item]
        "e": {"label": "save one + zero one MLP", "base": plain, "ours": save_and_zero},  # type: ignore[dict-item]
    }


def nnsight_tasks(directory: Path, ids: torch.Tensor, ids2: torch.Tensor) -> dict[str, Callable[[], object]] | None:
    try:
        from nnsight import LanguageModel as NNsightModel
    except ImportError:
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(directory).train(False)
    model = NNsightModel(hf, tokenizer=AutoTokenizer.from_pretrained(directory))
    blocks = model.transformer.h
    mid = len(blocks) // 2

    def one_save() -> object:
        with model.trace(ids):
            out = blocks[mid].output.save()
        return out

    def all_saves() -> object:
        outs = []
        with model.trace(ids):
            for block in blocks:
                outs.append(block.output.save())
        return outs

    def patching() -> object:
        with model.trace() as tracer:
            with tracer.invoke(ids):
                clean = blocks[mid].output[:, -1].save()
            with tracer.invoke(ids2):
                blocks[mid].output[:, -1] = clean
                logits = model.output.logits.save()
        return logits

    def generate_edit() -> object:
        with model.generate(ids, max_new_tokens=5, do_sample=False) as tracer:
            with tracer.iter[2]:
                blocks[0].output[:, -1] = 0
            out = model.generator.output.save()
        return out

    def save_and_zero() -> object:
        with model.trace(ids):
            out = blocks[0].output.save()
            blocks[-1].mlp.output = blocks[-1].mlp.output * 0
        return out

    return {"a": one_save, "b": all_saves, "c": patching, "d": generate_edit, "e": save_and_zero}


def run(label: str, directory: Path, keys: list[str], repeats: int, tokens: int = 16) -> None:
    model = nnfabric.LanguageModel(str(directory))
    ids = torch.randint(3, 300, (1, tokens), generator=torch.Generator().manual_seed(0))
    ids2 = torch.randint(3, 300, (1, tokens), generator=torch.Generator().manual_seed(1))
    ours = tasks(model, ids, ids2)
    theirs = nnsight_tasks(directory, ids, ids2)
    print(f"\n{label}")
    print(f"{'task':<34}{'plain ms':>10}{'ours ms':>10}{'ours/plain':>12}{'ours/nnsight':>14}")
    for key in keys:
        task = ours[key]
        fns = {"base": task["base"], "ours": task["ours"]}
        note = "n/a"
        if theirs is not None:
            try:
                theirs[key]()
                fns["nnsight"] = theirs[key]
            except Exception as exc:  # nnsight's own failure is reported, not fatal
                note = f"failed: {type(exc).__name__}"
        t = interleaved(fns, repeats)  # type: ignore[arg-type]
        versus = f"{t['ours'] / t['nnsight']:.2f}" if "nnsight" in t else note
        print(
            f"({key}) {task['label']:<30}{t['base'] * 1e3:>10.2f}{t['ours'] * 1e3:>10.2f}{t['ours'] / t['base']:>12.3f}{versus:>14}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small, tiny = Path(tmp, "small"), Path(tmp, "tiny")
        small_model(small)
        build_gpt2(tiny)
        run("GPT-2-small shape (12 x 768), 16 tokens, CPU", small, ["a", "b", "c", "d"], args.repeats)
        run("tiny GPT-2 (2 x 64), 57 tokens, CPU", tiny, ["e"], args.repeats * 10, tokens=57)


if __name__ == "__main__":
    main()
