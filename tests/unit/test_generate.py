"""Generation with per-step access: tracer.iter[...] and tracer.all()."""

import pytest
import torch

from tests.support.oracles import ids

PROMPT = "The Eiffel Tower is in"


def plain_generate(model, text, n, edit_step=None, edit=None, module=None):
    calls = {"n": 0}

    def hook(mod, args, out):
        step = calls["n"]
        calls["n"] += 1
        return edit(out) if step == edit_step else None

    handle = module.register_forward_hook(hook) if module is not None else None
    try:
        token_ids = ids(model, text)
        return model._module.generate(
            token_ids,
            attention_mask=torch.ones_like(token_ids),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id,
        )
    finally:
        if handle:
            handle.remove()


def test_generated_ids_match_plain_generate(gpt2):
    with gpt2.generate(PROMPT, max_new_tokens=4) as tracer:
        out = tracer.output.save()
    assert torch.equal(out.value, plain_generate(gpt2, PROMPT, 4))


def test_per_step_outputs_with_iter(gpt2):
    seen = []
    handle = gpt2._module.lm_head.register_forward_hook(lambda m, a, o: seen.append(o) and None)
    try:
        plain_generate(gpt2, PROMPT, 3)
    finally:
        handle.remove()
    with gpt2.generate(PROMPT, max_new_tokens=3) as tracer:
        logits = [gpt2.lm_head.output.save() for _ in tracer.iter[0:3]]
    assert len(logits) == 3
    for proxy, expected in zip(logits, seen, strict=True):
        assert torch.allclose(proxy.value, expected, atol=1e-6)


def test_editing_one_generation_step_matches_a_hook(llama):
    def zero_last(out):
        out = out.clone()
        out[:, -1] = 0
        return out

    with llama.generate(PROMPT, max_new_tokens=4) as tracer:
        with tracer.iter[2]:
            llama.model.layers[1].output[:, -1] = 0
        edited = tracer.output.save()
    expected = plain_generate(llama, PROMPT, 4, edit_step=2, edit=zero_last, module=llama._module.model.layers[1])
    assert torch.equal(edited.value, expected)
    assert not torch.equal(edited.value, plain_generate(llama, PROMPT, 4))


def test_all_steps_with_a_list(gpt2):
    with gpt2.generate(PROMPT, max_new_tokens=3) as tracer:
        tops = tracer.list().save()
        with tracer.all():
            tops.append(gpt2.lm_head.output[0, -1].argmax(-1))
        out = tracer.output.save()
    prompt_len = ids(gpt2, PROMPT).shape[1]
    assert [t.item() for t in tops.value] == out.value[0, prompt_len:].tolist()


def test_edit_every_step(gpt2):
    def add_one(out):
        return out + 1.0

    with gpt2.generate(PROMPT, max_new_tokens=3) as tracer:
        with tracer.all():
            gpt2.transformer.h[0].mlp.output = gpt2.transformer.h[0].mlp.output + 1.0
        out = tracer.output.save()
    handle = gpt2._module.transformer.h[0].mlp.register_forward_hook(lambda m, a, o: add_one(o))
    try:
        expected = plain_generate(gpt2, PROMPT, 3)
    finally:
        handle.remove()
    assert torch.equal(out.value, expected)


def test_step_out_of_range_is_refused(gpt2):
    with pytest.raises(IndexError, match=r"0\.\.2"):
        with gpt2.generate(PROMPT, max_new_tokens=3) as tracer:
            with tracer.iter[5]:
                pass
