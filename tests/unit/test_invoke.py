"""Several invokes batch into one forward pass; each sees only its own rows (seed scenario 1)."""

import torch

from tests.support.oracles import Hook, ids, plain_logits

CLEAN = "The Eiffel Tower is in the city of"
CORRUPT = "The Colosseum is in the city of"
OTHER = "Alice went to the market"


def token(model, text):
    return model.tokenizer(text)["input_ids"][0]


def test_invokes_run_in_one_forward_pass_and_match_single_runs(gpt2):
    with Hook(gpt2._module.transformer) as calls:
        with gpt2.trace() as tracer:
            with tracer.invoke(CLEAN):
                a = gpt2.output.logits.save()
            with tracer.invoke([OTHER, CORRUPT]):
                b = gpt2.output.logits.save()
            with tracer.invoke():
                everything = gpt2.transformer.h[0].output.save()
    assert len(calls.seen) == 1
    assert everything.shape[0] == 3
    for logits, text in [(a.value[0], CLEAN), (b.value[0], OTHER), (b.value[1], CORRUPT)]:
        n = len(gpt2.tokenizer(text)["input_ids"])
        assert torch.allclose(logits[-n:], plain_logits(gpt2, text)[0], atol=1e-5), text


def test_a_write_in_one_invoke_leaves_the_others_alone(llama):
    with llama.trace() as tracer:
        with tracer.invoke(CLEAN):
            untouched = llama.output.logits.save()
        with tracer.invoke(CLEAN):
            llama.model.layers[0].output[:] = 0
            edited = llama.output.logits.save()
    assert torch.allclose(untouched.value, plain_logits(llama, CLEAN), atol=1e-5)
    with Hook(llama._module.model.layers[0], edit=torch.zeros_like):
        assert torch.allclose(edited.value, plain_logits(llama, CLEAN), atol=1e-5)


def test_activation_patching_restores_the_clean_prediction(gpt2):
    """Seed scenario 1: patch one layer's last-token state from a clean into a corrupted prompt."""
    paris, rome = token(gpt2, " Paris"), token(gpt2, " Rome")
    last = gpt2.transformer.h[-1]
    with gpt2.trace() as tracer:
        with tracer.invoke(CLEAN):
            clean_state = last.output[:, -1].save()
            clean_logits = gpt2.output.logits[0, -1].save()
        with tracer.invoke(CORRUPT):
            corrupt_logits = gpt2.output.logits[0, -1].save()
        with tracer.invoke(CORRUPT):
            last.output[:, -1] = clean_state
            patched_logits = gpt2.output.logits[0, -1].save()

    def diff(logits):
        return (logits[paris] - logits[rome]).item()

    # The oracle: the plain model, and a hand-written hook doing the same patch.
    assert torch.allclose(clean_logits.value, plain_logits(gpt2, CLEAN)[0, -1], atol=1e-5)
    assert torch.allclose(corrupt_logits.value, plain_logits(gpt2, CORRUPT)[0, -1], atol=1e-5)

    def patch(out):
        out = out.clone()
        out[:, -1] = clean_state.value
        return out

    with Hook(gpt2._module.transformer.h[-1], edit=patch):
        expected = plain_logits(gpt2, CORRUPT)[0, -1]
    assert torch.allclose(patched_logits.value, expected, atol=1e-5)
    assert abs(diff(patched_logits.value) - diff(clean_logits.value)) < 1e-4
    assert abs(diff(corrupt_logits.value) - diff(clean_logits.value)) > 1e-3


def test_patching_an_early_layer_matches_a_hook(llama):
    with llama.trace() as tracer:
        with tracer.invoke(CLEAN):
            clean = llama.model.layers[0].output[:, -1].save()
        with tracer.invoke(CORRUPT):
            llama.model.layers[0].output[:, -1] = clean
            logits = llama.output.logits[:, -1].save()

    def patch(out):
        out = out.clone()
        out[:, -1] = clean.value
        return out

    with Hook(llama._module.model.layers[0], edit=patch):
        expected = plain_logits(llama, CORRUPT)[:, -1]
    assert torch.allclose(logits.value, expected, atol=1e-5)


def test_token_ids_and_dict_inputs(gpt2):
    token_ids = ids(gpt2, CLEAN)
    with gpt2.trace(token_ids[0].tolist()):
        from_list = gpt2.output.logits.save()
    with gpt2.trace({"input_ids": token_ids, "attention_mask": torch.ones_like(token_ids)}):
        from_dict = gpt2.output.logits.save()
    expected = plain_logits(gpt2, CLEAN)
    assert torch.equal(from_list.value, expected)
    assert torch.allclose(from_dict.value, expected, atol=1e-6)


def test_plain_module_invokes(mlp):
    x, y = torch.randn(2, 4), torch.randn(1, 4)
    with mlp.trace() as tracer:
        with tracer.invoke(x):
            out_x = mlp.output.save()
        with tracer.invoke(y):
            mlp[0].output = mlp[0].output * 0
            out_y = mlp.output.save()
    with torch.no_grad():
        assert torch.allclose(out_x.value, mlp._module(x))
        assert torch.allclose(out_y.value, mlp._module[2](mlp._module[1](torch.zeros(1, 8))))
