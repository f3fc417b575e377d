"""Every recipe in docs/cookbook.md runs as written, on the tiny GPT-2, and the ones with a
known answer give it (checked against the plain model or a hand-written hook)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

PAGE = Path(__file__).resolve().parents[2] / "docs" / "cookbook.md"


def recipes() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


def test_every_recipe_runs_in_order_and_the_checkable_ones_are_right(gpt2_dir):
    import nnfabric

    # A model of its own: asking for attention weights makes transformers install capture hooks
    # that stay on the model, and other tests check that the shared model carries no hooks.
    gpt2 = nnfabric.LanguageModel(str(gpt2_dir))
    names = {"model": gpt2, "nnfabric": nnfabric, "torch": torch}
    blocks = recipes()
    assert len(blocks) >= 9
    for block in blocks:
        code = compile(block, f"{PAGE.name} recipe", "exec")  # our own documentation, not a request
        exec(code, names)
    # Logit lens: the last layer's guess is the model's own prediction.
    ids = torch.tensor([gpt2.tokenizer(names["prompt"])["input_ids"]])
    with torch.no_grad():
        plain = gpt2._module(ids).logits[0, -1]
    assert names["guesses"][-1].value.item() == plain.argmax().item()
    # Patching the last layer at the last position gives the clean prediction.
    paris = names["paris"]
    with torch.no_grad():
        clean_logits = gpt2._module(torch.tensor([gpt2.tokenizer(names["clean"])["input_ids"]])).logits[0, -1]
    assert abs(names["effects"][-1] - clean_logits.softmax(-1)[paris].item()) < 1e-5
    assert abs(names["patched"][-1].value.item() - clean_logits[paris].item()) < 1e-4  # the session form agrees
    assert len(names["patterns"].value) == len(gpt2.transformer.h)
    assert names["shapes"]["transformer.h.0.mlp"][-1] == 64 and len(names["shapes"]) == 2
    assert len(names["choices"].value) == 4
    # `.source`: the MLP's activation equals a hand-written hook on its GELU module.
    seen = {}
    handle = gpt2._module.transformer.h[0].mlp.act.register_forward_hook(lambda m, a, o: seen.setdefault("act", o))
    with torch.no_grad():
        gpt2._module(torch.tensor([gpt2.tokenizer(names["clean"])["input_ids"]]))
    handle.remove()
    assert torch.equal(names["neurons"].value, seen["act"])
    assert names["width"] == 64 and names["hidden"].value.device.type == "meta"
    # The persistent edit equals a hook that zeroes the MLP; the model itself stays intact.
    handle = gpt2._module.transformer.h[0].mlp.register_forward_hook(lambda m, a, o: o * 0)
    clean_ids = torch.tensor([gpt2.tokenizer(names["clean"])["input_ids"]])
    with torch.no_grad():
        zeroed = gpt2._module(clean_ids).logits
    handle.remove()
    assert torch.equal(names["ablated_logits"].value, zeroed)
    with torch.no_grad():
        assert torch.equal(names["intact_logits"].value, gpt2._module(clean_ids).logits)
    # Every edit shows in its recipe's output: the edited value differs from the plain one.
    def moved(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max())

    assert moved(names["head_ablated"].value, names["plain_last"].value) > 1e-4  # head 0
    assert moved(names["ablated"].value, names["intact"].value) > 1e-4  # the .source neuron
    assert moved(names["pushed"].value, names["unpushed"].value) > 1e-4  # W_U[" Paris"]
    assert moved(names["after"].value, names["before"].value) > 1e-2  # the scanned width's direction
    assert moved(names["ablated_logits"].value, names["intact_logits"].value) > 1e-2
    assert names["steered"] != gpt2.tokenizer.decode(names["plain_tokens"].value[0])
    # The attention weights of one module equal the eager model's, read by a hand-written hook.
    eager = nnfabric.LanguageModel(str(gpt2_dir), attn_implementation="eager")._module
    seen = {}
    handle = eager.transformer.h[0].attn.register_forward_hook(lambda m, a, o: seen.update(w=o[1]))
    with torch.no_grad():
        eager(clean_ids)
    handle.remove()
    assert torch.allclose(names["layer0"].value, seen["w"], atol=1e-6)
