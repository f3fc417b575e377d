"""Methods that used to be silently wrong, checked against hand-written PyTorch (autograd on the
plain model): several backward calls in one trace, one backward per invoke in a batch, and
`.save()` inside a block that spans several generation steps."""

from __future__ import annotations

import traceback

import pytest
import torch

PROMPT = "The Eiffel Tower is in the city of"
OTHER = "Alice went to the market"


def oracle_grads(model, prompt, targets, layer=0):
    """d logits[0, -1, t] / d (block `layer`'s output), for each t, by autograd on the plain model."""
    ids = torch.tensor([model.tokenizer(prompt)["input_ids"]])
    seen = {}
    handle = model._module.transformer.h[layer].register_forward_hook(lambda m, a, o: seen.setdefault("h", o))
    try:
        logits = model._module(ids).logits
    finally:
        handle.remove()
    return [torch.autograd.grad(logits[0, -1, t], seen["h"], retain_graph=True)[0] for t in targets]


def check_each_backward_call_has_its_own_gradient(gpt2, alice, remote):
    model = alice if remote else gpt2
    first, second = oracle_grads(model, PROMPT, [5, 7])
    with model.trace(PROMPT, remote=remote):
        h = model.transformer.h[0].output
        before = h.grad.save()  # written before the first backward: that one's gradient
        model.output.logits[0, -1, 5].backward()
        after_first = h.grad.save()
        model.output.logits[0, -1, 7].backward()
        after_second = h.grad.save()
    assert torch.allclose(before.value, first, atol=1e-6)
    assert torch.allclose(after_first.value, first, atol=1e-6)
    assert torch.allclose(after_second.value, second, atol=1e-6)
    assert not torch.allclose(first, second, atol=1e-6)


def test_each_backward_call_has_its_own_gradient(gpt2):
    check_each_backward_call_has_its_own_gradient(gpt2, None, False)


def check_one_backward_per_invoke_gives_each_invoke_its_own_gradient(gpt2, alice, remote):
    model = alice if remote else gpt2
    (expected_a,) = oracle_grads(model, PROMPT, [5])
    (expected_b,) = oracle_grads(model, OTHER, [9])
    with model.trace(remote=remote) as tracer:
        with tracer.invoke(PROMPT):
            a = model.transformer.h[0].output
            model.output.logits[0, -1, 5].backward()
            grad_a = a.grad.save()
        with tracer.invoke(OTHER):
            b = model.transformer.h[0].output
            model.output.logits[0, -1, 9].backward()
            grad_b = b.grad.save()
    n_a, n_b = expected_a.shape[1], expected_b.shape[1]
    # Left padding: each invoke's rows end with its own tokens.
    assert torch.allclose(grad_a.value[:, -n_a:], expected_a, atol=1e-5)
    assert torch.allclose(grad_b.value[:, -n_b:], expected_b, atol=1e-5)
    assert grad_b.value.abs().sum() > 0


def test_one_backward_per_invoke_gives_each_invoke_its_own_gradient(gpt2):
    check_one_backward_per_invoke_gives_each_invoke_its_own_gradient(gpt2, None, False)


@pytest.mark.parametrize("block", ["all", "range"])
def test_save_inside_a_block_over_several_steps_says_what_to_do_at_the_users_line(gpt2, block):
    with pytest.raises(ValueError, match=r"tracer\.list\(\)") as info:
        with gpt2.generate(PROMPT, max_new_tokens=3) as tracer:
            with tracer.all() if block == "all" else tracer.iter[0:2]:
                gpt2.lm_head.output.save()  # the line that must be named
    frame = traceback.extract_tb(info.tb)
    assert any("the line that must be named" in (f.line or "") for f in frame)


def test_save_inside_a_single_step_block_and_per_step_loops_still_work(gpt2):
    with gpt2.generate(PROMPT, max_new_tokens=3) as tracer:
        with tracer.iter[1]:
            one = gpt2.lm_head.output.save()
    with gpt2.generate(PROMPT, max_new_tokens=3) as tracer:
        each = [gpt2.lm_head.output.save() for _ in tracer.iter[0:3]]
    assert one.value.shape[-1] == 300 and torch.equal(one.value, each[1].value)


def eager_attentions(model, prompt):
    module = model._module
    current = module.config._attn_implementation
    module.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return module(torch.tensor([model.tokenizer(prompt)["input_ids"]]), output_attentions=True).attentions
    finally:
        module.set_attn_implementation(current)


def check_forward_keywords_reach_the_model_and_attention_weights_come_back(gpt2_dir, alice, remote):
    import nnfabric

    # Its own model: transformers leaves capture hooks on a model asked for attention weights.
    gpt2 = nnfabric.LanguageModel(str(gpt2_dir))
    model = alice if remote else gpt2
    expected = eager_attentions(model, PROMPT)
    with model.trace(PROMPT, output_attentions=True, remote=remote):
        weights = model.output.attentions.save()
        logits = model.output.logits.save()
    assert len(weights.value) == len(expected) == 2
    for got, want in zip(weights.value, expected, strict=True):
        assert got.shape == (1, 4, want.shape[-1], want.shape[-1]) and torch.allclose(got, want, atol=1e-6)
    assert logits.value.shape[1] == expected[0].shape[-1]  # the prompt was not dropped
    assert gpt2._module.config._attn_implementation != "eager" or remote  # put back after the run


def test_forward_keywords_reach_the_model_and_attention_weights_come_back(gpt2_dir):
    check_forward_keywords_reach_the_model_and_attention_weights_come_back(gpt2_dir, None, False)


def test_generate_passes_its_other_keywords_to_the_model(gpt2):
    ids = torch.tensor([gpt2.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        expected = gpt2._module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                         repetition_penalty=3.0, pad_token_id=1)  # fmt: skip
        plain = gpt2._module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                      pad_token_id=1)  # fmt: skip
    with gpt2.generate(PROMPT, max_new_tokens=5, repetition_penalty=3.0) as tracer:
        out = tracer.output.save()
    assert torch.equal(out.value, expected)
    assert not torch.equal(expected, plain)  # the keyword changed something


def test_keywords_the_fabric_owns_are_refused_at_the_users_line(gpt2):
    import nnfabric

    with pytest.raises(nnfabric.InterventionError, match="past_key_values"):
        with gpt2.trace(PROMPT, past_key_values=None):
            gpt2.lm_head.output.save()




def test_parameters_cannot_be_changed_in_a_trace(gpt2):
    import nnfabric

    before = gpt2._module.lm_head.weight.detach().clone()
    with pytest.raises(nnfabric.InterventionError, match="parameters cannot be changed"):
        with gpt2.trace(PROMPT):
            gpt2.lm_head.weight[0] = 0
    with pytest.raises(nnfabric.InterventionError, match="parameters cannot be changed"):
        with gpt2.trace(PROMPT):
            gpt2.lm_head.weight.zero_()
    assert torch.equal(gpt2._module.lm_head.weight, before)


def hooked_outputs(model, prompt):
    """Every module's output (first call) through hand-written forward hooks on the plain model."""
    seen = {}
    handles = [module.register_forward_hook(lambda m, a, o, name=name: seen.setdefault(name, o))
               for name, module in model._module.named_modules() if name]  # fmt: skip
    try:
        with torch.no_grad():
            model._module(torch.tensor([model.tokenizer(prompt)["input_ids"]]))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def check_cache_saves_every_modules_output_whatever_order_the_model_calls_them(gpt2, alice, remote):
    model = alice if remote else gpt2
    expected = hooked_outputs(gpt2, PROMPT)
    with model.trace(PROMPT, remote=remote) as tracer:
        cache = tracer.cache()
    assert set(cache) == {path for path, _ in gpt2._module.named_modules() if path}
    for path, proxy in cache.items():
        if path in expected:
            value, want = proxy.value, expected[path]
            if isinstance(want, torch.Tensor):
                assert torch.allclose(value, want, atol=1e-6), path
        else:  # a module this run never calls has no value, and says so
            with pytest.raises(ValueError):
                _ = proxy.value


def test_cache_saves_every_modules_output_whatever_order_the_model_calls_them(gpt2):
    check_cache_saves_every_modules_output_whatever_order_the_model_calls_them(gpt2, None, False)


def test_cache_by_path_with_inputs(gpt2):
    with gpt2.trace(PROMPT) as tracer:
        cache = tracer.cache("mlp.c_proj", inputs=True)
    assert set(cache) == {f"transformer.h.{i}.mlp.c_proj{end}" for i in range(2) for end in ("", ".input")}
    expected = hooked_outputs(gpt2, PROMPT)
    assert torch.allclose(cache["transformer.h.1.mlp.c_proj"].value, expected["transformer.h.1.mlp.c_proj"], atol=1e-6)
    with pytest.raises(ValueError, match="no module path contains"):
        with gpt2.trace(PROMPT) as tracer:
            tracer.cache("nothing-like-this")


def check_the_gradient_of_an_indexed_activation_is_the_activations_gradient_indexed(gpt2, alice, remote):
    model = alice if remote else gpt2
    (expected,) = oracle_grads(model, PROMPT, [5])
    (expected_other,) = oracle_grads(model, OTHER, [9])
    with model.trace(remote=remote) as tracer:
        with tracer.invoke(PROMPT):
            last = model.transformer.h[0].output[:, -1]
            first_unit = model.transformer.h[0].output[0, :, 3]
            model.output.logits[0, -1, 5].backward()
            g_last = last.grad.save()
            g_unit = first_unit.grad.save()
        with tracer.invoke(OTHER):
            other_last = model.transformer.h[0].output[:, -1]
            model.output.logits[0, -1, 9].backward()
            g_other = other_last.grad.save()
    assert torch.allclose(g_last.value, expected[:, -1], atol=1e-6)
    assert torch.allclose(g_unit.value, expected[0, -g_unit.value.shape[0] :, 3], atol=1e-6)
    assert torch.allclose(g_other.value, expected_other[:, -1], atol=1e-6)


def test_the_gradient_of_an_indexed_activation_is_the_activations_gradient_indexed(gpt2):
    check_the_gradient_of_an_indexed_activation_is_the_activations_gradient_indexed(gpt2, None, False)


def test_setting_the_gradient_of_an_indexed_activation_edits_only_those_entries(gpt2):
    """Zeroing the gradient at the last position of block 1 leaves block 0's gradient equal to
    autograd's with that position's gradient cut by a hand-written tensor hook."""
    ids = torch.tensor([gpt2.tokenizer(PROMPT)["input_ids"]])
    seen = {}

    def cut_last(module, args, output):  # type: ignore[no-untyped-def]
        output.register_hook(lambda g: torch.cat([g[:, :-1], torch.zeros_like(g[:, -1:])], dim=1))

    handles = [
        gpt2._module.transformer.h[1].register_forward_hook(cut_last),
        gpt2._module.transformer.h[0].register_forward_hook(lambda m, a, o: seen.setdefault("h0", o)),
    ]
    try:
        logits = gpt2._module(ids).logits
        (expected,) = torch.autograd.grad(logits[0, -1, 5], seen["h0"])
    finally:
        for handle in handles:
            handle.remove()
    with gpt2.trace(PROMPT):
        h0 = gpt2.transformer.h[0].output
        last1 = gpt2.transformer.h[1].output[:, -1]
        gpt2.output.logits[0, -1, 5].backward()
        last1.grad = torch.zeros(1, 64)
        g0 = h0.grad.save()
    assert torch.allclose(g0.value, expected, atol=1e-6)


def eager_module_outputs(model_dir, prompt, paths):
    """Each module's output on a model loaded with eager attention, by hand-written hooks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(str(model_dir))(prompt)["input_ids"]])
    seen = {}
    handles = [module.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: seen.update({p: o})) for p in paths]
    try:
        with torch.no_grad():
            module(ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attention_weights_read_any_way_equal_an_eager_models_locally(family, gpt2_dir, llama_dir):
    import nnfabric

    directory = gpt2_dir if family == "gpt2" else llama_dir
    model = nnfabric.LanguageModel(str(directory))  # loaded as served: fused (sdpa) attention
    assert model._module.config._attn_implementation == "sdpa"
    layers = model.transformer.h if family == "gpt2" else model.model.layers
    attn = [layer.attn if family == "gpt2" else layer.self_attn for layer in layers]
    paths = [a._path for a in attn]
    expected = eager_module_outputs(directory, PROMPT, paths)
    with model.trace(PROMPT) as tracer:
        kernel = attn[0].source.attention_interface_0.output[1].save()  # the kernel call runs first
        weights = attn[0].output[1].save()
        whole = attn[1].output.save()
    for got in (weights.value, kernel.value, whole.value[1]):
        assert got is not None and got.shape[-2:] == (expected[paths[0]][1].shape[-1],) * 2
    assert torch.allclose(weights.value, expected[paths[0]][1], atol=1e-6)
    assert torch.allclose(kernel.value, expected[paths[0]][1], atol=1e-6)
    assert torch.allclose(whole.value[1], expected[paths[1]][1], atol=1e-6)
    with model.trace(PROMPT) as tracer:
        cached = tracer.cache("attn" if family == "gpt2" else "self_attn")
    for path in paths:
        assert torch.allclose(cached[path].value[1], expected[path][1], atol=1e-6)
    with model.scan(PROMPT):
        scanned_kernel = attn[0].source.attention_interface_0.output.save()
        scanned = attn[0].output.save()
    assert scanned.value[1].shape == expected[paths[0]][1].shape == scanned_kernel.value[1].shape
    assert model._module.config._attn_implementation == "sdpa"  # put back after each run
    # Reading only the attention output keeps the fused kernel, and its value is the plain model's.
    with model.trace(PROMPT):
        out = attn[0].output[0].save()
    assert torch.allclose(out.value, expected[paths[0]][0], atol=1e-5)




def check_a_dict_input_passes_its_other_entries_to_the_forward(gpt2_dir, alice, remote):
    import nnfabric

    gpt2 = nnfabric.LanguageModel(str(gpt2_dir))  # its own: transformers leaves capture hooks
    model = alice if remote else gpt2
    expected = eager_attentions(model, PROMPT)
    ids = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
    with model.trace({"input_ids": ids, "output_attentions": True}, remote=remote):
        out = model.output.attentions.save()
    assert len(out.value) == len(expected)
    for got, want in zip(out.value, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)


def test_a_dict_input_passes_its_other_entries_to_the_forward(gpt2_dir):
    check_a_dict_input_passes_its_other_entries_to_the_forward(gpt2_dir, None, False)


def test_a_language_model_refuses_unknown_input_entries_by_name(gpt2):
    from nnfabric.runtime.adapters import CausalLMAdapter

    adapter = CausalLMAdapter(gpt2._module, gpt2.tokenizer)
    with pytest.raises(ValueError, match="'output_attentions'"):
        adapter.rows_for([], {"input_ids": [[5, 6]], "output_attentions": True})
