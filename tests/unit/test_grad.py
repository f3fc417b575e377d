"""Gradients of activations, read and edited inside the trace (seed scenario 2)."""

import nnfabric
import pytest
import torch

from tests.support.oracles import ids

CLEAN = "The Eiffel Tower is in the city of"
CORRUPT = "The Colosseum is in the city of"


def by_hand(model, text, layer, target):
    """Autograd done by hand: retain the activation's grad with a plain hook."""
    kept = {}

    def keep(module, args, out):
        out.retain_grad()
        kept["h"] = out

    handle = model._module.transformer.h[layer].register_forward_hook(keep)
    try:
        logits = model._module(ids(model, text)).logits
        target(logits).backward()
    finally:
        handle.remove()
        model._module.zero_grad(set_to_none=True)
    return kept["h"].detach(), kept["h"].grad


def test_grad_of_an_activation_matches_autograd(gpt2):
    tok = gpt2.tokenizer(" Paris")["input_ids"][0]
    with gpt2.trace(CLEAN):
        h = gpt2.transformer.h[0].output
        grad = h.grad.save()
        gpt2.output.logits[0, -1, tok].backward()
    _, expected = by_hand(gpt2, CLEAN, 0, lambda logits: logits[0, -1, tok])
    assert torch.allclose(grad.value, expected, atol=1e-6)


def test_grad_read_after_backward_and_no_parameter_grads(gpt2):
    with gpt2.trace(CLEAN):
        h = gpt2.transformer.h[1].output
        gpt2.output.logits.sum().backward()
        grad = h.grad.save()
    _, expected = by_hand(gpt2, CLEAN, 1, lambda logits: logits.sum())
    assert torch.allclose(grad.value, expected, atol=1e-6)
    assert all(p.grad is None for p in gpt2._module.parameters())


def test_attribution_patching(gpt2):
    """grad x (clean - corrupted) activation, computed in the graph, checked against autograd."""
    paris, rome = gpt2.tokenizer(" Paris")["input_ids"][0], gpt2.tokenizer(" Rome")["input_ids"][0]
    with gpt2.trace() as tracer:
        with tracer.invoke(CLEAN):
            clean_last = gpt2.transformer.h[0].output[:, -1].save()
        with tracer.invoke(CORRUPT):
            h = gpt2.transformer.h[0].output
            corrupt_last = h[:, -1].clone()
            logits = gpt2.output.logits
            (logits[0, -1, paris] - logits[0, -1, rome]).backward()
            attribution = (h.grad[:, -1] * (clean_last - corrupt_last)).sum().save()
    clean_h, _ = by_hand(gpt2, CLEAN, 0, lambda lg: lg.sum())
    corrupt_h, corrupt_grad = by_hand(gpt2, CORRUPT, 0, lambda lg: lg[0, -1, paris] - lg[0, -1, rome])
    expected = (corrupt_grad[:, -1] * (clean_h[:, -1] - corrupt_h[:, -1])).sum()
    assert torch.allclose(clean_last.value, clean_h[:, -1], atol=1e-5)
    assert attribution.value.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


def test_writing_a_grad_changes_upstream_grads(gpt2):
    with gpt2.trace(CLEAN):
        early = gpt2.transformer.h[0].output
        late = gpt2.transformer.h[1].output
        early_grad = early.grad.save()
        late.grad = late.grad * 2
        gpt2.output.logits.sum().backward()
    _, expected = by_hand(gpt2, CLEAN, 0, lambda logits: logits.sum())
    assert torch.allclose(early_grad.value, expected * 2, atol=1e-5)


def test_grad_without_backward_is_a_clear_error(gpt2):
    with pytest.raises(nnfabric.InterventionError, match=r"call \.backward\(\)"):
        with gpt2.trace(CLEAN):
            gpt2.transformer.h[0].output.grad.save()
