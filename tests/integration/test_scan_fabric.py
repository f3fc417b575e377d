"""`model.scan()` from a thin client on the fabric: the shapes a local scan gives."""

from __future__ import annotations

import nnfabric

PROMPTS = ["The Eiffel Tower is in the city of", "Alice went"]


def test_a_thin_client_scans_on_the_fabric(gpt2, fabric):
    thin = nnfabric.connect(fabric.url, fabric.keys["alice"], progress=False).model("tiny-gpt2")
    with thin.scan(PROMPTS[0], remote=True):
        act = thin.transformer.h[0].mlp.source.self_act_0.output.save()
        hidden = thin.transformer.h[1].output.save()
    with gpt2.scan(PROMPTS[0]):
        local_act = gpt2.transformer.h[0].mlp.source.self_act_0.output.save()
        local_hidden = gpt2.transformer.h[1].output.save()
    assert hidden.value.device.type == "meta"
    assert (hidden.value.shape, hidden.value.dtype) == (local_hidden.value.shape, local_hidden.value.dtype)
    assert act.value.shape == local_act.value.shape == (1, len(gpt2.tokenizer(PROMPTS[0])["input_ids"]), 256)
