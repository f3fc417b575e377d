"""nnfabric on a GPU (or, without one, the same measurements on the CPU with a tiny model).

    python benchmarks/gpu.py                       # CUDA if present: 1B and 8B Llama shapes; else tiny
    python benchmarks/gpu.py --shapes 1b --sizes 1,16 --quick

Random-weight Llama shapes and a tokenizer trained here: nothing is downloaded. One table:

1. correctness against hand-written PyTorch hooks (float32 and bfloat16, and a model split over
   two devices by accelerate: the GPU and the CPU): activation patching, gradient x activation,
   steered greedy generation;
2. local overhead: a trace that patches one layer and saves the last logits, against the plain
   model doing the same with a hook (and against nnsight, where it is installed);
3. the replica's executor: n patching jobs merged, each alone, and a plain batched forward of the
   same prompts, at each n; "ours/job" is (merged - plain) / n, the fabric's own cost per job;
   and how far merged logits stray from solo ones (the kernels' batch-dependent rounding);
4. merged generation: 16 jobs of 16 greedy tokens with an edit at every step, against one plain
   batched `generate` of the same prompts; host syncs (`.item()`/`.tolist()` and, on a GPU,
   stream synchronisations) per step.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "client"))
sys.path.insert(0, str(ROOT))

import nnfabric  # noqa: E402
from nnfabric.runtime import wire  # noqa: E402

from services.common.catalog import ModelLimits, ModelSpec  # noqa: E402
from services.worker.executor import BatchExecutor  # noqa: E402
from tests.support.models import train_tokenizer  # noqa: E402

SHAPES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 300},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256},
}  # fmt: skip
PROMPT_TOKENS = 32
NEW_TOKENS = 16
ROWS: list[tuple[str, str, str]] = []  # (section, what, figure)


def row(section: str, what: str, figure: str) -> None:
    ROWS.append((section, what, figure))
    print(f"  {section:<12} {what:<58} {figure}", flush=True)


# -- models --------------------------------------------------------------------------------
def build(shape: str, dtype: torch.dtype, device: str, tokenizer_dir: Path) -> nnfabric.LanguageModel:
    """A random-weight Llama of the shape, on `device`, without touching the CPU's memory for its weights."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=1, eos_token_id=2,
                         bos_token_id=2, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    # Its buffers (to_empty left them uninitialised), as transformers makes them, in float32.
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    model.train(False)
    return nnfabric.LanguageModel(model, tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir))


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n, PROMPT_TOKENS), generator=generator).tolist()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@contextlib.contextmanager
def host_syncs() -> Iterator[dict[str, int]]:
    """Reads of a tensor's value by the host made meanwhile: `.item()`, `bool(t)`, `int(t)`
    (aten::_local_scalar_dense) and `.tolist()` each wait for the device to finish its queue."""
    from torch.profiler import ProfilerActivity, profile

    counts = {"scalar": 0, "tolist": 0}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield counts
    for event in prof.key_averages():
        if event.key == "aten::_local_scalar_dense":
            counts["scalar"] += event.count
    counts["tolist"] = 0  # .tolist() reads through _local_scalar_dense too


# -- jobs as the fabric receives them ---------------------------------------------------------
class _Capture:
    """A backend that keeps the job's envelope instead of running it."""

    def __init__(self) -> None:
        self.body = b""

    def run(self, request: Any) -> None:
        request.apply_edits_here()
        self.body = wire.pack_job(request.graphs, request.tensors, request.session)
        request.deliver([{} for _ in request.graphs])


def envelope(model: nnfabric.LanguageModel, record: Callable[[], None]) -> bytes:
    capture = _Capture()
    original = model.backend
    model.backend = lambda remote: capture  # type: ignore[method-assign]
    try:
        record()
    finally:
        model.backend = original  # type: ignore[method-assign]
    return capture.body


def layers(model: nnfabric.LanguageModel) -> Any:
    return model.model.layers


def patch_job(model: nnfabric.LanguageModel, ids: list[int]) -> bytes:
    layer = layers(model)[len(layers(model)) // 2]

    def record() -> None:
        with model.trace(ids):
            layer.output = layer.output * 1.5
            model.output.logits[:, -1].save()

    return envelope(model, record)


def steer_job(model: nnfabric.LanguageModel, ids: list[int]) -> bytes:
    layer = layers(model)[len(layers(model)) // 2]

    def record() -> None:
        with model.generate(ids, max_new_tokens=NEW_TOKENS) as tracer:
            with tracer.all():
                layer.output[:, -1] = layer.output[:, -1] * 1.5
            tracer.output.save()

    return envelope(model, record)


def executor(model: nnfabric.LanguageModel, max_batch: int) -> BatchExecutor:
    spec = ModelSpec(name="bench", source="x", limits=ModelLimits(max_batch=max_batch, timeout_s=3600,  # type: ignore[call-arg]
                                                                  max_new_tokens=NEW_TOKENS))  # fmt: skip
    return BatchExecutor(spec, model._module, model.tokenizer)


def value(outcome: Any) -> torch.Tensor:
    assert outcome.ok, outcome.error
    (found,) = wire.unpack_result(outcome.result).values()
    return found


# -- 1. correctness ---------------------------------------------------------------------------
def hooked(module: torch.nn.Module, fn: Callable[[Any], Any]) -> Any:
    return module.register_forward_hook(lambda m, a, o: fn(o))


def correctness(model: nnfabric.LanguageModel, label: str, tolerance: float) -> None:
    hf = model._module
    clean, corrupt = prompts(2, seed=1)
    layer_index = len(layers(model)) // 2
    block = hf.model.layers[layer_index]
    device = next(hf.parameters()).device
    # Activation patching: the clean last-token state into the corrupt run.
    with model.trace() as tracer:
        with tracer.invoke(clean):
            state = layers(model)[layer_index].output[:, -1]
        with tracer.invoke(corrupt):
            layers(model)[layer_index].output[:, -1] = state
            patched = model.output.logits[0, -1].save()
    seen: dict[str, torch.Tensor] = {}
    handle = hooked(block, lambda o: seen.update(h=o.detach().clone()))
    with torch.no_grad():
        hf(torch.tensor([clean], device=device))
    handle.remove()

    def put(o: torch.Tensor) -> torch.Tensor:
        o = o.clone()
        o[:, -1] = seen["h"][:, -1].to(o.device)
        return o

    handle = hooked(block, put)
    with torch.no_grad():
        expected = hf(torch.tensor([corrupt], device=device)).logits[0, -1]
    handle.remove()
    patch_error = float((patched.value.float() - expected.float().cpu()).abs().max())
    # Gradient x activation.
    target = 7
    with model.trace(clean):
        h = layers(model)[layer_index].output
        model.output.logits[0, -1, target].backward()
        attribution = (h.grad * h).sum(-1).save()
    kept: dict[str, torch.Tensor] = {}
    handle = hooked(block, lambda o: kept.update(h=o))
    logits = hf(torch.tensor([clean], device=device)).logits
    handle.remove()
    (grad,) = torch.autograd.grad(logits[0, -1, target], kept["h"])
    oracle = (grad * kept["h"]).sum(-1).detach().float().cpu()
    grad_error = float((attribution.value.float() - oracle).abs().max())
    hf.zero_grad(set_to_none=True)
    # Steered greedy generation.
    with model.generate(clean, max_new_tokens=8) as tracer:
        with tracer.all():
            layers(model)[layer_index].output[:, -1] = layers(model)[layer_index].output[:, -1] * 1.5

        tokens = tracer.output.save()

    def steer(o: torch.Tensor) -> torch.Tensor:
        o = o.clone()
        o[:, -1] = o[:, -1] * 1.5
        return o

    handle = hooked(block, steer)
    with torch.no_grad():
        ids = torch.tensor([clean], device=device)
        generated = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                pad_token_id=1)  # fmt: skip
    handle.remove()
    same = bool(torch.equal(tokens.value.cpu(), generated.cpu()))
    ok = patch_error <= tolerance and grad_error <= tolerance * 10 and same
    row("correct", f"{label}: patching / grad x act / steered tokens",
        f"{patch_error:.2e} / {grad_error:.2e} / {'same' if same else 'DIFFERENT'} {'ok' if ok else 'FAIL'}")  # fmt: skip


def split_correctness(model: nnfabric.LanguageModel, device: str) -> None:
    """The model split by accelerate over the GPU and the CPU gives the unsplit model's values."""
    from accelerate import dispatch_model

    hf = model._module
    ids = prompts(1, seed=3)[0]
    with model.trace(ids):
        whole = model.output.logits[0, -1].save()
    count = len(hf.model.layers)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": (0 if i < count // 2 else "cpu") for i in range(count)})
    split = dispatch_model(hf, device_map=device_map, main_device=device)
    splitted = nnfabric.LanguageModel(split, tokenizer=model.tokenizer)
    with splitted.trace() as tracer:
        with tracer.invoke(ids):
            early = splitted.model.layers[1].output[:, -1]  # on the GPU
        with tracer.invoke(ids):
            splitted.model.layers[count - 1].output[:, -1] = early  # into a CPU layer
            crossed = splitted.output.logits[0, -1].save()
        with tracer.invoke(ids):
            again = splitted.output.logits[0, -1].save()
    error = float((again.value.float() - whole.value.float()).abs().max())
    row("correct", "split over GPU + CPU (accelerate): logits, cross-device patch",
        f"{error:.2e} / {'ran' if crossed.value.device.type == 'cpu' else 'NOT ON HOST'}")  # fmt: skip


# -- 2. local overhead -------------------------------------------------------------------------
def overhead(model: nnfabric.LanguageModel, device: str, repeats: int) -> None:
    hf = model._module
    ids = torch.tensor(prompts(1)[0])
    layer = hf.model.layers[len(hf.model.layers) // 2]

    def plain() -> object:
        handle = layer.register_forward_hook(lambda m, a, o: o * 1.5)
        try:
            with torch.no_grad():
                return hf(ids[None].to(device)).logits[:, -1].cpu()
        finally:
            handle.remove()

    def ours() -> object:
        with model.trace(ids):
            layers(model)[len(hf.model.layers) // 2].output = layers(model)[len(hf.model.layers) // 2].output * 1.5
            out = model.output.logits[:, -1].save()
        return out.value

    base, mine = timed(plain, device, repeats), timed(ours, device, repeats)
    row("overhead", "patch one layer, save last logits: ours / plain with a hook", f"{mine / base:.2f}x")
    try:
        import nnsight
    except ImportError:
        row("overhead", "nnsight", "not installed")
        return
    theirs_model = nnsight.LanguageModel(hf, tokenizer=model.tokenizer)

    def theirs() -> object:
        with theirs_model.trace(ids[None].to(device)):
            block = theirs_model.model.layers[len(hf.model.layers) // 2]
            block.output = block.output * 1.5
            out = theirs_model.output.logits[:, -1].save()
        return out

    row("overhead", "the same with nnsight: ours / nnsight", f"{mine / timed(theirs, device, repeats):.2f}x")


# -- 3. the executor ---------------------------------------------------------------------------
def executor_rows(model: nnfabric.LanguageModel, shape: str, device: str, sizes: list[int], repeats: int) -> None:
    for n in sizes:
        executor_row(model, shape, device, n, repeats)


def executor_row(model: nnfabric.LanguageModel, shape: str, device: str, n: int, repeats: int) -> None:
    hf = model._module
    rows = prompts(n, seed=n)
    bodies = [(f"{i:032x}", patch_job(model, ids)) for i, ids in enumerate(rows)]
    merged_executor = executor(model, n)
    batch = torch.tensor(rows, device=device)
    layer = hf.model.layers[len(hf.model.layers) // 2]

    def plain() -> object:
        handle = layer.register_forward_hook(lambda m, a, o: o * 1.5)
        try:
            with torch.no_grad():
                return hf(batch).logits[:, -1].cpu()
        finally:
            handle.remove()

    merged_s = timed(lambda: merged_executor.run(bodies), device, repeats)
    solo_s = timed(lambda: merged_executor.run(bodies[:1]), device, repeats)
    plain_s = timed(plain, device, repeats)
    decode_s = timed(lambda: merged_executor.prepare(bodies), device, repeats)
    merged = merged_executor.run(bodies)
    solo = {job_id: value(executor(model, 1).run([(job_id, body)])[job_id]) for job_id, body in bodies[:4]}
    stray = max(float((value(merged[j]).float() - s.float()).abs().max()) for j, s in solo.items())
    row(f"exec {shape}", f"n={n:<3} ms/job merged / solo / plain; ours/job (decoding); max merged-solo",
        f"{merged_s / n * 1e3:.2f} / {solo_s * 1e3:.2f} / {plain_s / n * 1e3:.2f}; "
        f"{(merged_s - plain_s) / n * 1e3:.3f} ({decode_s / n * 1e3:.3f}); {stray:.2e}")  # fmt: skip


# -- 4. merged generation ------------------------------------------------------------------------
def generation_rows(model: nnfabric.LanguageModel, shape: str, device: str, repeats: int, n: int = 16) -> None:
    hf = model._module
    rows = prompts(n, seed=99)
    bodies = [(f"{i:032x}", steer_job(model, ids)) for i, ids in enumerate(rows)]
    ex = executor(model, n)
    batch = torch.tensor(rows, device=device)
    layer = hf.model.layers[len(hf.model.layers) // 2]

    def plain() -> object:
        def steer(m: Any, a: Any, o: torch.Tensor) -> torch.Tensor:
            o = o.clone()
            o[:, -1] = o[:, -1] * 1.5
            return o

        handle = layer.register_forward_hook(steer)
        try:
            with torch.no_grad():
                return hf.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=NEW_TOKENS,
                                   do_sample=False, pad_token_id=1).cpu()  # fmt: skip
        finally:
            handle.remove()

    merged_s = timed(lambda: ex.run(bodies), device, repeats)
    plain_s = timed(plain, device, repeats)
    with host_syncs() as ours:
        outcomes = ex.run(bodies)
    with host_syncs() as theirs:
        expected = plain()
    same = all(torch.equal(value(outcomes[j]).cpu(), expected[i : i + 1]) for i, (j, _) in enumerate(bodies))
    row(f"gen {shape}", f"{n} jobs x {NEW_TOKENS} tokens: ms/job merged / plain generate; ratio",
        f"{merged_s / n * 1e3:.2f} / {plain_s / n * 1e3:.2f}; {merged_s / plain_s:.2f}x")  # fmt: skip
    row(f"gen {shape}", "host reads of device values per step: merged / plain; tokens equal",
        f"{ours['scalar'] / NEW_TOKENS:.1f} / {theirs['scalar'] / NEW_TOKENS:.1f}; "
        f"{'yes' if same else 'NO'}")  # fmt: skip
    if device.startswith("cuda"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            ex.run(bodies)
            torch.cuda.synchronize()
        syncs = sum(e.count for e in prof.key_averages() if "Synchronize" in e.key)
        copies = sum(e.count for e in prof.key_averages() if "Memcpy" in e.key or "memcpy" in e.key)
        row(f"gen {shape}", "stream synchronisations / memcpys per step (merged)",
            f"{syncs / NEW_TOKENS:.1f} / {copies / NEW_TOKENS:.1f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--shapes", default="1b,8b" if cuda else "tiny")
    parser.add_argument("--sizes", default="1,4,16,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no split check")
    args = parser.parse_args()
    device, repeats = args.device, (2 if args.quick else args.repeats)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"device: {torch.cuda.get_device_name(0) if device.startswith('cuda') else 'cpu'}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(Path(tmp))
        shapes = args.shapes.split(",")
        # 1. correctness: the smallest shape asked for, in both dtypes; split over two devices.
        first = shapes[0]
        for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
            model = build(first, dtype, device, Path(tmp))
            correctness(model, f"{first} {str(dtype).removeprefix('torch.')}", tolerance)
            if dtype is torch.float32 and device.startswith("cuda") and not args.quick:
                split_correctness(model, device)
            del model
        if not device.startswith("cuda"):
            row("correct", "split over two devices", "n/a without a GPU")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        for shape in shapes:
            model = build(shape, dtype, device, Path(tmp))
            overhead(model, device, repeats * 4)
            executor_rows(model, shape, device, sizes, repeats)
            generation_rows(model, shape, device, repeats)
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    print("\n| section | what | figure |\n|---|---|---|")
    for section, what, figure in ROWS:
        print(f"| {section} | {what} | {figure} |")


if __name__ == "__main__":
    main()
