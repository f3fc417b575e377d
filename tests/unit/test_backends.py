"""Backends chosen where the trace opens: here, here through the wire format, or the fabric."""

import nnfabric
import nnfabric.backends
import pytest
import torch

from tests.support.oracles import plain_logits

PROMPT = "The Eiffel Tower is in the city of"


def edited_logits(model, remote):
    with model.trace(PROMPT, remote=remote):
        model.transformer.h[0].output[0][:, -1] = 0
        logits = model.output.logits.save()
    return logits.value


def test_local_and_loopback_agree_bit_for_bit_and_match_a_hand_written_hook(gpt2, monkeypatch):
    monkeypatch.setattr(nnfabric.backends, "DEFAULT_LOCAL", "local")
    here = edited_logits(gpt2, remote=False)
    wired = edited_logits(gpt2, remote="local")

    def zero_last(module, args, output):
        output[0][:, -1] = 0
        return output

    handle = gpt2._module.transformer.h[0].register_forward_hook(zero_last)
    try:
        expected = plain_logits(gpt2, PROMPT)
    finally:
        handle.remove()
    assert torch.equal(here, expected) and torch.equal(wired, expected)


def test_loopback_really_travels_through_the_wire(gpt2, monkeypatch):
    from nnfabric.runtime import wire

    packed = []
    original = wire.pack_job
    monkeypatch.setattr(wire, "pack_job", lambda *a, **k: packed.append(1) or original(*a, **k))
    monkeypatch.setattr(nnfabric.backends, "DEFAULT_LOCAL", "local")
    edited_logits(gpt2, remote=False)
    assert packed == []
    edited_logits(gpt2, remote="local")
    assert packed == [1]


def test_loopback_errors_point_at_the_users_line(gpt2):
    with pytest.raises(nnfabric.InterventionError) as info:
        with gpt2.trace(PROMPT, remote="local"):
            gpt2.transformer.h[0].output.view(7, 7).save()  # the loopback bad line
    assert "the loopback bad line" in info.value.line.code


def test_an_unknown_backend_is_refused(gpt2):
    with pytest.raises(ValueError, match="remote must be"):
        with gpt2.trace(PROMPT, remote="elsewhere"):
            gpt2.lm_head.output.save()


def test_remote_without_a_name_says_how_to_give_one(mlp):
    with pytest.raises(nnfabric.InterventionError, match="remote_name"):
        with mlp.trace(torch.ones(1, 4), remote=True):
            mlp[0].output.save()
