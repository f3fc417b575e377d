"""Reads and writes inside one trace, each checked against the plain model or a hand-written hook."""

import pytest
import torch

from tests.support.oracles import Hook, ids, plain_logits

PROMPT = "The Eiffel Tower is in the city of"


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_saved_outputs_equal_what_a_hook_sees(name, request):
    model = request.getfixturevalue(name)
    blocks = model.transformer.h if name == "gpt2" else model.model.layers
    torch_blocks = model._module.transformer.h if name == "gpt2" else model._module.model.layers
    with model.trace(PROMPT):
        saved = [block.output.save() for block in blocks]
        logits = model.output.logits.save()
    hooks = [Hook(b) for b in torch_blocks]
    expected = plain_logits(model, PROMPT)
    for hook in hooks:
        hook.__exit__()
    for proxy, hook in zip(saved, hooks, strict=True):
        assert torch.equal(proxy.value, hook.seen[0])
    assert torch.equal(logits.value, expected)


def test_saved_proxy_forwards_to_its_value(gpt2):
    with gpt2.trace(PROMPT):
        h = gpt2.transformer.h[0].output.save()
    assert h.shape == h.value.shape
    assert torch.equal(h[0, -1], h.value[0, -1])
    assert torch.equal(h.sum(-1), h.value.sum(-1))
    assert torch.equal(h * 2, h.value * 2)


def test_input_and_inputs(gpt2):
    with gpt2.trace(PROMPT):
        ln_out = gpt2.transformer.h[1].ln_2.output.save()
        mlp_in = gpt2.transformer.h[1].mlp.input.save()
        args_kwargs = gpt2.transformer.h[1].mlp.inputs.save()
    assert torch.equal(mlp_in.value, ln_out.value)
    args, kwargs = args_kwargs.value
    assert torch.equal(args[0], ln_out.value) and isinstance(kwargs, dict)


def test_operators_methods_and_functions(gpt2):
    with gpt2.trace(PROMPT):
        h = gpt2.transformer.h[0].output
        a = (h[:, -1, :] * 2 + 1).save()
        b = h.softmax(-1).argmax(-1).save()
        c = torch.cat([h, h], dim=0).norm().save()
        d = torch.nn.functional.softmax(h, dim=-1).mean(-1).save()
        e = (h > 0).sum().save()
        f = h.to(torch.float64).dtype.save()
        g = (-h).abs().max().item().save()
    ref = gpt2._module(ids(gpt2, PROMPT), output_hidden_states=True).hidden_states[1].detach()
    assert torch.equal(a.value, ref[:, -1, :] * 2 + 1)
    assert torch.equal(b.value, ref.softmax(-1).argmax(-1))
    assert torch.allclose(c.value, torch.cat([ref, ref]).norm())
    assert torch.allclose(d.value, ref.softmax(-1).mean(-1))
    assert e.value == (ref > 0).sum()
    assert f.value == torch.float64
    assert g.value == pytest.approx((-ref).abs().max().item())


def test_replacing_an_output_changes_downstream(gpt2):
    with gpt2.trace(PROMPT):
        gpt2.transformer.h[0].mlp.output = gpt2.transformer.h[0].mlp.output * 0
        logits = gpt2.output.logits.save()
    with Hook(gpt2._module.transformer.h[0].mlp, edit=lambda out: out * 0):
        expected = plain_logits(gpt2, PROMPT)
    assert torch.equal(logits.value, expected)
    assert not torch.equal(logits.value, plain_logits(gpt2, PROMPT))


def test_in_place_edit_of_the_last_token(gpt2):
    with gpt2.trace(PROMPT):
        gpt2.transformer.h[0].output[:, -1] = 0
        logits = gpt2.output.logits.save()

    def zero_last(out):
        out = out.clone()
        out[:, -1] = 0
        return out

    with Hook(gpt2._module.transformer.h[0], edit=zero_last):
        expected = plain_logits(gpt2, PROMPT)
    assert torch.equal(logits.value, expected)


def test_edit_inside_a_tuple_output(gpt2):
    with gpt2.trace(PROMPT):
        gpt2.transformer.h[1].attn.output[0][:] = 0
        logits = gpt2.output.logits.save()

    def zero_first(out):
        return (torch.zeros_like(out[0]), *out[1:])

    with Hook(gpt2._module.transformer.h[1].attn, edit=zero_first):
        expected = plain_logits(gpt2, PROMPT)
    assert torch.equal(logits.value, expected)


def test_in_place_add_on_a_slice(gpt2):
    with gpt2.trace(PROMPT):
        gpt2.transformer.h[0].output[:, -1] += 3.0
        logits = gpt2.output.logits.save()

    def add(out):
        out = out.clone()
        out[:, -1] += 3.0
        return out

    with Hook(gpt2._module.transformer.h[0], edit=add):
        expected = plain_logits(gpt2, PROMPT)
    assert torch.equal(logits.value, expected)


def test_writing_an_input(gpt2):
    with gpt2.trace(PROMPT):
        gpt2.transformer.h[1].mlp.input = gpt2.transformer.h[1].mlp.input * 0.5
        logits = gpt2.output.logits.save()
    handle = gpt2._module.transformer.h[1].mlp.register_forward_pre_hook(lambda m, a: (a[0] * 0.5,))
    try:
        expected = plain_logits(gpt2, PROMPT)
    finally:
        handle.remove()
    assert torch.equal(logits.value, expected)


def test_plain_module(mlp):
    x = torch.randn(3, 4)
    with mlp.trace(x):
        hidden = mlp[1].output.save()
        mlp[2].output = mlp[2].output + 1
        out = mlp.output.save()
    torch_mlp = mlp._module
    with torch.no_grad():
        ref_hidden = torch_mlp[1](torch_mlp[0](x))
        assert torch.equal(hidden.value, ref_hidden)
        assert torch.equal(out.value, torch_mlp[2](ref_hidden) + 1)


def test_logit_lens_calls_modules_on_values(gpt2):
    with gpt2.trace(PROMPT):
        h = gpt2.transformer.h[0].output
        lens = gpt2.lm_head(gpt2.transformer.ln_f(h)).save()
        final = gpt2.output.logits.save()
    torch_model = gpt2._module
    with torch.no_grad():
        hidden = torch_model(ids(gpt2, PROMPT), output_hidden_states=True).hidden_states[1]
        assert torch.allclose(lens.value, torch_model.lm_head(torch_model.transformer.ln_f(hidden)), atol=1e-6)
    assert torch.equal(final.value, plain_logits(gpt2, PROMPT))


def test_stop_ends_the_forward_pass_early(gpt2):
    with Hook(gpt2._module.lm_head) as later:
        with gpt2.trace(PROMPT) as tracer:
            h = gpt2.transformer.h[0].output.save()
            tracer.stop()
    assert later.seen == []
    assert h.value.shape[-1] == 64


def test_no_grad_unless_the_graph_asks(gpt2):
    with gpt2.trace(PROMPT):
        logits = gpt2.output.logits.save()
    assert not logits.value.requires_grad


def test_hooks_are_removed_after_the_trace(gpt2):
    before = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in gpt2._module.named_modules()}
    with gpt2.trace(PROMPT):
        gpt2.transformer.h[0].output[:] = 0
        gpt2.transformer.h[1].mlp.input.save()
    after = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in gpt2._module.named_modules()}
    assert before == after
    assert torch.equal(gpt2.output if False else plain_logits(gpt2, PROMPT), plain_logits(gpt2, PROMPT))


def test_module_called_twice_is_addressed_by_call_index():
    import nnfabric

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.layer(self.layer(x))

    torch.manual_seed(0)
    net = Twice()
    model = nnfabric.Model(net)
    x = torch.randn(2, 4)
    with model.trace(x):
        first = model.layer.output.save()
        second = model.layer.next().output.save()
        model.layer.call(1).output = second * 0 + 7
        out = model.output.save()
    with torch.no_grad():
        assert torch.equal(first.value, net.layer(x))
        assert torch.equal(second.value, net.layer(net.layer(x)))
    assert torch.equal(out.value, torch.full((2, 4), 7.0))
