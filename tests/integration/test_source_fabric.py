"""`.source` from a thin client: the same operation names as local, run remotely with local results."""

from __future__ import annotations

import nnfabric
import torch

PROMPT = "The Eiffel Tower is in the city of"
OTHER = "Alice went to the market"


def test_thin_client_sees_the_operations_and_runs_them_remotely(gpt2, fabric):
    thin = nnfabric.connect(fabric.url, fabric.keys["alice"], progress=False).model("tiny-gpt2")
    assert "self_act_0" in repr(thin.transformer.h[0].mlp.source)
    assert list(thin.transformer.h[0].attn.source) == list(gpt2.transformer.h[0].attn.source)
    with thin.trace(PROMPT, remote=True):
        act = thin.transformer.h[0].mlp.source.self_act_0.output.save()
        thin.transformer.h[1].attn.source.attention_interface_0.output[0][:] = 0
        logits = thin.output.logits.save()
    with gpt2.trace(PROMPT):
        local_act = gpt2.transformer.h[0].mlp.source.self_act_0.output.save()
        gpt2.transformer.h[1].attn.source.attention_interface_0.output[0][:] = 0
        local_logits = gpt2.output.logits.save()
    assert torch.equal(act.value, local_act.value)
    assert torch.equal(logits.value, local_logits.value)
