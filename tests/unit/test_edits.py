"""Persistent edits (`model.edit()`): every later trace of the edited model applies them, checked
against hand-written hooks on the plain model; remotely they are one user's own, listed and removed
through the api, and no other user's job sees them."""

from __future__ import annotations

import nnfabric
import pytest
import torch
from nnfabric.errors import InterventionError

PROMPT = "The Eiffel Tower is in the city of"
OTHER = "Alice went to the market"


def hooked(model, prompt, module, edit, generate=0):  # type: ignore[no-untyped-def]
    """The plain model's logits (or generated ids) with a forward hook that returns edit(output)."""
    ids = torch.tensor([model.tokenizer(prompt)["input_ids"]])
    handle = module.register_forward_hook(lambda m, a, o: edit(o))
    try:
        with torch.no_grad():
            if generate:
                return model._module.generate(ids, max_new_tokens=generate, do_sample=False, pad_token_id=1)
            return model._module(ids).logits
    finally:
        handle.remove()


def test_an_edited_model_applies_the_edit_to_every_trace_and_generation(gpt2):
    mlp = gpt2._module.transformer.h[0].mlp
    with gpt2.edit() as ablated:
        gpt2.transformer.h[0].mlp.output[:] = 0  # recorded on the original object: nnsight's form
    with ablated.trace(PROMPT):
        edited = ablated.output.logits.save()
    with gpt2.trace(PROMPT):
        untouched = gpt2.output.logits.save()
    assert torch.equal(edited.value, hooked(gpt2, PROMPT, mlp, lambda o: o * 0))
    assert torch.equal(untouched.value, hooked(gpt2, PROMPT, mlp, lambda o: o))
    with ablated.generate(PROMPT, max_new_tokens=4) as tracer:
        tokens = tracer.output.save()
    assert torch.equal(tokens.value, hooked(gpt2, PROMPT, mlp, lambda o: o * 0, generate=4))
    assert gpt2.edits == [] and len(ablated.edits) == 1


def test_the_trace_sees_the_edited_value_and_the_edit_covers_every_invoke(gpt2):
    direction = torch.randn(64, generator=torch.Generator().manual_seed(7))
    block = gpt2._module.transformer.h[1]
    with gpt2.edit() as steered:
        steered.transformer.h[1].output[:, -1] += direction  # recorded on the edited object
    with steered.trace() as tracer:
        with tracer.invoke(PROMPT):
            seen = steered.transformer.h[1].output.save()
            first = steered.output.logits.save()
        with tracer.invoke(OTHER):
            second = steered.output.logits.save()

    def add_last(output):  # type: ignore[no-untyped-def]
        output = output.clone()
        output[:, -1] += direction
        return output

    expected = hooked(gpt2, PROMPT, block, add_last)
    n = expected.shape[1]
    assert torch.allclose(first.value[:, -n:], expected, atol=1e-5)
    assert torch.allclose(seen.value[0, -1], hooked_hidden(gpt2, PROMPT, block) + direction, atol=1e-5)
    expected_other = hooked(gpt2, OTHER, block, add_last)
    assert torch.allclose(second.value[:, -expected_other.shape[1] :], expected_other, atol=1e-5)


def hooked_hidden(model, prompt, block):  # type: ignore[no-untyped-def]
    seen = {}
    handle = block.register_forward_hook(lambda m, a, o: seen.setdefault("h", o))
    with torch.no_grad():
        model._module(torch.tensor([model.tokenizer(prompt)["input_ids"]]))
    handle.remove()
    return seen["h"][0, -1]


def test_inplace_edits_stack_and_clear(gpt2_dir):
    model = nnfabric.LanguageModel(str(gpt2_dir))
    with model.edit(inplace=True):
        model.transformer.h[0].mlp.output[:] = 0
    with model.edit(inplace=True):
        model.transformer.h[1].mlp.output[:] = 0
    handles = [model._module.transformer.h[i].mlp.register_forward_hook(lambda m, a, o: o * 0) for i in (0, 1)]
    ids = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        expected = model._module(ids).logits
    for handle in handles:
        handle.remove()
    with model.trace(PROMPT):
        both = model.output.logits.save()
    assert torch.equal(both.value, expected) and len(model.edits) == 2
    model.clear_edits()
    with model.trace(PROMPT):
        plain = model.output.logits.save()
    with torch.no_grad():
        assert torch.equal(plain.value, model._module(ids).logits)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("x = model.transformer.h[0].mlp.output.save()", "keeps no values"),
        ("x = model.transformer.h[0].mlp.output * 2", "changes nothing"),
        ("model.output.logits.backward()", "cannot be part of an edit"),
    ],
)
def test_edits_that_are_not_edits_are_refused_at_the_users_line(gpt2, body, message):
    with pytest.raises((ValueError, InterventionError), match=message):
        with gpt2.edit():
            exec(body, {"model": gpt2})  # the test's own code, standing for a user's line
    assert gpt2.open_recording is None


















