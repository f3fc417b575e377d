"""`.source`: operations inside a module's forward, read and written like modules, on every family
`transformers` ships that we try; checked against the plain model and hand-written hooks."""

from __future__ import annotations

import contextlib

import nnfabric
import pytest
import torch
import transformers as hf
from nnfabric.errors import GraphError
from nnfabric.graph.ir import Graph, Invoke, Node
from nnfabric.graph.validate import Limits, validate_graph
from nnfabric.runtime.source import instrumented, module_operations

PROMPT = "The Eiffel Tower is in the city of"
OTHER = "Alice went to the market"


def _tiny(config_class, model_class, **overrides):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    sizes = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=100, max_position_embeddings=64,
    )  # fmt: skip
    sizes.update(overrides)
    return model_class(config_class(**sizes)).eval()


FAMILIES = {
    "gpt_neox": lambda: _tiny(hf.GPTNeoXConfig, hf.GPTNeoXForCausalLM),
    "phi": lambda: _tiny(hf.PhiConfig, hf.PhiForCausalLM),
    "gemma": lambda: _tiny(hf.GemmaConfig, hf.GemmaForCausalLM, num_key_value_heads=2, head_dim=8),
    "qwen2": lambda: _tiny(hf.Qwen2Config, hf.Qwen2ForCausalLM, num_key_value_heads=2),
    "bloom": lambda: (torch.manual_seed(0), hf.BloomForCausalLM(hf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=100)).eval())[1],
    "opt": lambda: (
        torch.manual_seed(0),
        hf.OPTForCausalLM(
            hf.OPTConfig(
                hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                max_position_embeddings=64, word_embed_proj_dim=32,
            )
        ).eval(),
    )[1],
}  # fmt: skip


def _family(name, gpt2, llama):  # type: ignore[no-untyped-def]
    if name == "gpt2":
        return gpt2._module
    if name == "llama":
        return llama._module
    return FAMILIES[name]()


@pytest.mark.parametrize("family", ["gpt2", "llama", *FAMILIES])
def test_every_module_rewritten_at_once_computes_the_same_logits(family, gpt2, llama):
    """The rewrite changes nothing but where calls go: all modules instrumented, the logits are
    bit for bit the plain model's, and every call the forward makes has a published name."""
    model = _family(family, gpt2, llama)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(ids).logits
    published = {path: {op.name for op in module_operations(m)} for path, m in model.named_modules()}
    seen: list[tuple[str, str]] = []
    with contextlib.ExitStack() as stack:
        for path, module in model.named_modules():
            if published[path]:

                def on_call(name, fn, args, kwargs, path=path):  # type: ignore[no-untyped-def]
                    seen.append((path, name))
                    return fn(*args, **kwargs)

                stack.enter_context(instrumented(module, on_call))
        with torch.no_grad():
            rewritten = model(ids).logits
    assert torch.equal(plain, rewritten)
    assert seen and all(name in published[path] for path, name in seen)
    # Leaving restores the model's own forward.
    assert all("forward" not in m.__dict__ for m in model.modules())


def _activation_op(model):  # type: ignore[no-untyped-def]
    """In block 0, a module whose forward calls its activation submodule exactly once: the
    module's path, the operation's name, and the activation module (for a hand-written hook)."""
    for path, module in model.named_modules():
        if ".0" not in f"{path}." or "attn" in path or "attention" in path:
            continue
        names = [op.name for op in module_operations(module)]
        for name in names:
            child = name.removeprefix("self_").rsplit("_", 1)[0]
            once = sum(n.rsplit("_", 1)[0] == f"self_{child}" for n in names) == 1
            sub = dict(module.named_children()).get(child)
            kind = type(sub).__name__.lower()
            if name.startswith("self_") and once and any(a in kind for a in ("act", "gelu", "silu", "relu")):
                return path, name, sub
    raise AssertionError("no module calls an activation submodule")


@pytest.mark.parametrize("family", ["gpt2", "llama", *FAMILIES])
def test_reading_and_writing_an_operation_matches_a_hook_on_the_activation_it_calls(family, gpt2, llama):
    torch_model = _family(family, gpt2, llama)
    path, op_name, child = _activation_op(torch_model)
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(4))
    seen = {}
    handle = child.register_forward_hook(lambda m, a, o: seen.setdefault("out", o.detach().clone()))
    with torch.no_grad():
        torch_model(ids)
    handle.remove()
    handle = child.register_forward_hook(lambda m, a, o: o * 0)
    with torch.no_grad():
        zeroed_reference = torch_model(ids).logits
    handle.remove()

    model = nnfabric.Model(torch_model)
    envoy = model
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    assert op_name in repr(envoy.source)
    with model.trace(input_ids=ids):
        read = getattr(envoy.source, op_name).output.save()
    assert torch.equal(read.value, seen["out"])
    with model.trace(input_ids=ids):
        operation = getattr(envoy.source, op_name)
        operation.output = operation.output * 0
        logits = model.output.logits.save()
    assert torch.equal(logits.value, zeroed_reference)


def test_attention_interface_output_edit_matches_zeroing_the_output_projections_input(gpt2, llama):
    for model, block, projection in [
        (gpt2, gpt2.transformer.h[1], gpt2._module.transformer.h[1].attn.c_proj),
        (llama, llama.model.layers[1], llama._module.model.layers[1].self_attn.o_proj),
    ]:
        handle = projection.register_forward_pre_hook(lambda m, args: (args[0] * 0,))
        ids = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
        with torch.no_grad():
            expected = model._module(ids).logits
        handle.remove()
        attention = block.attn if model is gpt2 else block.self_attn
        with model.trace(PROMPT):
            attention.source.attention_interface_0.output[0][:] = 0
            logits = model.output.logits.save()
        assert torch.equal(logits.value, expected)


def test_invokes_edit_only_their_own_rows_through_source(gpt2):
    def solo(prompt, scale):  # type: ignore[no-untyped-def]
        with gpt2.trace(prompt):
            op = gpt2.transformer.h[0].mlp.source.self_act_0
            op.output = op.output * scale
            return gpt2.output.logits.save()

    alone_a, alone_b = solo(PROMPT, 0.0), solo(OTHER, 2.0)
    with gpt2.trace() as tracer:
        with tracer.invoke(PROMPT):
            op = gpt2.transformer.h[0].mlp.source.self_act_0
            op.output = op.output * 0.0
            a = gpt2.output.logits.save()
        with tracer.invoke(OTHER):
            op = gpt2.transformer.h[0].mlp.source.self_act_0
            op.output = op.output * 2.0
            b = gpt2.output.logits.save()
    n_a, n_b = alone_a.value.shape[1], alone_b.value.shape[1]
    assert torch.allclose(a.value[:, -n_a:], alone_a.value, atol=1e-5)
    assert torch.allclose(b.value[:, -n_b:], alone_b.value, atol=1e-5)


def test_source_operations_per_generation_step(gpt2):
    """Steering through an operation at one generation step only equals a hand-written hook that
    edits the module it calls at that step's forward pass."""
    direction = torch.randn(64, generator=torch.Generator().manual_seed(5)) * 8
    calls = []

    def steer(module, args, output):  # type: ignore[no-untyped-def]
        calls.append(1)
        return output + direction if len(calls) == 3 else output

    ids = torch.tensor([gpt2.tokenizer(PROMPT)["input_ids"]])
    handle = gpt2._module.transformer.h[1].mlp.c_proj.register_forward_hook(steer)
    try:
        expected = gpt2._module.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=1)
    finally:
        handle.remove()
    with gpt2.generate(PROMPT, max_new_tokens=4) as tracer:
        plain = tracer.output.save()
    with gpt2.generate(PROMPT, max_new_tokens=4) as tracer:
        with tracer.iter[2]:
            op = gpt2.transformer.h[1].mlp.source.self_c_proj_0
            op.output = op.output + direction
        steered = tracer.output.save()
    assert torch.equal(steered.value, expected)
    assert not torch.equal(steered.value, plain.value)


def test_unknown_operations_are_refused_with_the_nearest_name(gpt2):
    with pytest.raises(AttributeError, match="did you mean 'self_act_0'"):
        gpt2.transformer.h[0].mlp.source.self_act_1  # noqa: B018
    with pytest.raises(AttributeError, match="has no operations"):  # a ModuleList has no forward
        gpt2.transformer.h.source.anything  # noqa: B018
    graph = Graph(kind="trace")
    graph.invokes.append(Invoke(args=None))
    graph.add(Node(op="output", args=["transformer.h.0.mlp.source.os_system_0", 0, 0], invoke=0))
    with pytest.raises(GraphError, match="no module"):
        validate_graph(graph, Limits(), module_paths=gpt2.paths)


