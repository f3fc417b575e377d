"""`model.scan()`: the shapes and dtypes a trace would see, from fake tensors (no data, no
compute), locally and for thin clients; checked against hooks on the plain model."""

from __future__ import annotations

import functools

import pytest
import torch
from nnfabric.errors import InterventionError

PROMPTS = ["The Eiffel Tower is in the city of", "Alice went"]


def real_shapes(model, prompts):  # type: ignore[no-untyped-def]
    """Every module's output shape and dtype, by hooks on a real padded forward pass."""
    found = {}

    def record(path, module, args, output):  # type: ignore[no-untyped-def]
        if isinstance(output, torch.Tensor):
            found.setdefault(path, (tuple(output.shape), output.dtype))

    handles = [
        module.register_forward_hook(functools.partial(record, path))
        for path, module in model._module.named_modules()
        if path
    ]
    batch = model.tokenizer(prompts, return_tensors="pt", padding=True)
    try:
        with torch.no_grad():
            model._module(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _cached_shapes(model, prompts, scan):  # type: ignore[no-untyped-def]
    with (model.scan() if scan else model.trace()) as tracer:
        for prompt in prompts:
            with tracer.invoke(prompt):
                pass
        with tracer.invoke():
            cache = tracer.cache()
    found = {}
    for path, proxy in cache.items():
        if proxy._resolved() and isinstance(proxy.value, torch.Tensor):
            assert (proxy.value.device.type == "meta") == scan
            found[path] = (tuple(proxy.value.shape), proxy.value.dtype)
    return found


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_a_scan_reports_every_modules_shape_and_dtype_without_data(which, gpt2, llama):
    model = gpt2 if which == "gpt2" else llama
    expected = real_shapes(model, PROMPTS[:1])
    scanned = _cached_shapes(model, PROMPTS[:1], scan=True)
    assert {p: scanned[p] for p in expected} == expected
    # A padded batch of two prompts: what the real trace sees, module by module.
    assert _cached_shapes(model, PROMPTS, scan=True) == _cached_shapes(model, PROMPTS, scan=False)


def test_a_scan_catches_an_edit_of_the_wrong_shape_at_the_users_line(gpt2):
    with pytest.raises(InterventionError, match="size") as info:
        with gpt2.scan(PROMPTS[0]):
            gpt2.transformer.h[0].output[:, -1] = torch.zeros(65)  # one too many
    assert "torch.zeros(65)" in str(info.value)
    with gpt2.scan(PROMPTS[0]):
        gpt2.transformer.h[0].output[:, -1] = torch.zeros(64)
        logits = gpt2.output.logits.save()
    assert logits.value.shape == (1, len(gpt2.tokenizer(PROMPTS[0])["input_ids"]), 300)


def test_a_scan_changes_no_weight_and_refuses_writes_to_them(gpt2):
    before = {k: v.clone() for k, v in gpt2._module.state_dict().items()}
    with pytest.raises(InterventionError, match="parameters cannot be changed"):
        with gpt2.scan(PROMPTS[0]):
            gpt2.lm_head.weight[:] = 0
    with gpt2.scan(PROMPTS[0]):
        gpt2.transformer.h[0].mlp.output[:] = 0
    assert all(torch.equal(before[k], v) for k, v in gpt2._module.state_dict().items())




def test_a_generation_cannot_be_scanned(gpt2):
    with pytest.raises(InterventionError, match="scan the prompt"):
        with gpt2.generate(PROMPTS[0], max_new_tokens=2, scan=True) as tracer:
            tracer.output.save()
