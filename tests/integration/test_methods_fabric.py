"""Methods on the fabric: the checks of tests/unit/test_methods.py run remotely (gradients,
forward keywords, cache, indexed gradients, dict inputs), thin clients reading weights, and
attention weights read remotely, against hand-written PyTorch."""

import torch

from tests.unit.test_methods import (
    PROMPT,
    check_a_dict_input_passes_its_other_entries_to_the_forward,
    check_cache_saves_every_modules_output_whatever_order_the_model_calls_them,
    check_each_backward_call_has_its_own_gradient,
    check_forward_keywords_reach_the_model_and_attention_weights_come_back,
    check_one_backward_per_invoke_gives_each_invoke_its_own_gradient,
    check_the_gradient_of_an_indexed_activation_is_the_activations_gradient_indexed,
    eager_module_outputs,
)


def test_each_backward_call_has_its_own_gradient_remotely(gpt2, alice):
    check_each_backward_call_has_its_own_gradient(gpt2, alice, True)


def test_one_backward_per_invoke_gives_each_invoke_its_own_gradient_remotely(gpt2, alice):
    check_one_backward_per_invoke_gives_each_invoke_its_own_gradient(gpt2, alice, True)


def test_forward_keywords_reach_the_model_and_attention_weights_come_back_remotely(gpt2_dir, alice):
    check_forward_keywords_reach_the_model_and_attention_weights_come_back(gpt2_dir, alice, True)


def test_cache_saves_every_modules_output_whatever_order_the_model_calls_them_remotely(gpt2, alice):
    check_cache_saves_every_modules_output_whatever_order_the_model_calls_them(gpt2, alice, True)


def test_the_gradient_of_an_indexed_activation_is_the_activations_gradient_indexed_remotely(gpt2, alice):
    check_the_gradient_of_an_indexed_activation_is_the_activations_gradient_indexed(gpt2, alice, True)


def test_a_dict_input_passes_its_other_entries_to_the_forward_remotely(gpt2_dir, alice):
    check_a_dict_input_passes_its_other_entries_to_the_forward(gpt2_dir, alice, True)


def test_parameters_are_readable_in_a_trace_locally_and_from_a_thin_client(gpt2, fabric):
    import nnfabric

    with gpt2.trace(PROMPT):
        final = gpt2.transformer.ln_f.output
        logits = gpt2.output.logits.save()
        by_hand = (final @ gpt2.lm_head.weight.T).save()  # the unembedding, read inside the trace
    assert torch.allclose(by_hand.value, logits.value, atol=1e-5)
    thin = nnfabric.connect(fabric.url, fabric.keys["bob"], progress=False).model("tiny-gpt2")
    assert "weight" in dir(thin.lm_head)
    token = gpt2.tokenizer(" Paris")["input_ids"][0]
    with thin.trace(PROMPT, remote=True):
        direction = thin.lm_head.weight[token].save()  # W_U[token], with no weights on this side
        thin.transformer.h[1].output[:, -1] += direction
        steered = thin.output.logits[0, -1].save()
    assert torch.equal(direction.value, gpt2._module.lm_head.weight[token].detach())
    with gpt2.trace(PROMPT):
        gpt2.transformer.h[1].output[:, -1] += gpt2._module.lm_head.weight[token].detach()
        local = gpt2.output.logits[0, -1].save()
    assert torch.equal(steered.value, local.value)


def test_attention_weights_read_remotely_equal_an_eager_models(gpt2_dir, alice):
    expected = eager_module_outputs(gpt2_dir, PROMPT, ["transformer.h.0.attn", "transformer.h.1.attn"])
    with alice.trace(PROMPT, remote=True) as tracer:
        kernel = alice.transformer.h[0].attn.source.attention_interface_0.output[1].save()
        weights = alice.transformer.h[1].attn.output[1].save()
        cached = tracer.cache(".attn")
    assert torch.allclose(kernel.value, expected["transformer.h.0.attn"][1], atol=1e-6)
    assert torch.allclose(weights.value, expected["transformer.h.1.attn"][1], atol=1e-6)
    assert torch.allclose(cached["transformer.h.0.attn"].value[1], expected["transformer.h.0.attn"][1], atol=1e-6)
    with alice.scan(PROMPT, remote=True):
        shapes = alice.transformer.h[0].attn.output.save()
    assert shapes.value[1].shape == expected["transformer.h.0.attn"][1].shape
