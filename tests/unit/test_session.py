"""Sessions: several traces as one job; later traces use earlier values in place."""

import nnfabric
import pytest
import torch

from tests.support.oracles import ids

SOURCE = "The Eiffel Tower is in Paris"
PROMPT = "The Colosseum is in"


def test_a_value_crosses_into_a_later_generation(gpt2):
    block = gpt2._module.transformer.h[1]
    with gpt2.session() as session:
        with gpt2.trace(SOURCE):
            vector = gpt2.transformer.h[1].output[0, -1]
        with gpt2.generate(PROMPT, max_new_tokens=4) as tracer:
            with tracer.all():
                gpt2.transformer.h[1].output[:, -1] += 3 * vector
            tokens = tracer.output.save()
    assert len(session.recordings) == 2

    # Oracle: the vector from a plain forward pass, added by a hand-written hook at every step.
    with torch.no_grad():
        seen = []
        handle = block.register_forward_hook(lambda m, a, out: seen.append(out[0, -1].clone()))
        gpt2._module(ids(gpt2, SOURCE))
        handle.remove()

        def add(module, args, out):
            out = out.clone()
            out[:, -1] += 3 * seen[0]
            return out

        handle = block.register_forward_hook(add)
        prompt = ids(gpt2, PROMPT)
        expected = gpt2._module.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
            pad_token_id=gpt2.tokenizer.pad_token_id,
        )  # fmt: skip
        handle.remove()
    assert torch.equal(tokens.value, expected)


def test_values_used_across_traces_are_not_returned_unless_saved(gpt2):
    with gpt2.session():
        with gpt2.trace(SOURCE):
            kept = gpt2.transformer.h[0].output.save()
            passed = gpt2.transformer.h[1].output
        with gpt2.trace(PROMPT):
            product = (gpt2.transformer.h[0].output[0, -1] * passed[0, -1]).sum().save()
    with torch.no_grad():
        first = gpt2._module.transformer.h[0]
        seen = []
        handles = [first.register_forward_hook(lambda m, a, o: seen.append(o.clone())),
                   gpt2._module.transformer.h[1].register_forward_hook(lambda m, a, o: seen.append(o.clone()))]  # fmt: skip
        gpt2._module(ids(gpt2, SOURCE))
        gpt2._module(ids(gpt2, PROMPT))
        for handle in handles:
            handle.remove()
    source_h0, source_h1, prompt_h0, _ = seen
    assert torch.allclose(kept.value, source_h0)
    assert torch.allclose(product.value, (prompt_h0[0, -1] * source_h1[0, -1]).sum(), atol=1e-5)
    with pytest.raises(ValueError, match="not saved"):
        _ = passed.value


def test_an_error_in_a_later_trace_points_at_its_line(gpt2):
    with pytest.raises(nnfabric.InterventionError) as info:
        with gpt2.session():
            with gpt2.trace(SOURCE):
                vector = gpt2.transformer.h[1].output[0, -1]
            with gpt2.trace(PROMPT):
                gpt2.transformer.h[1].output[:, -1] = vector.reshape(7, 7)  # wrong shape
    assert info.value.trace == 1
    assert "vector.reshape(7, 7)" in str(info.value)


def test_a_value_from_an_unrelated_trace_is_refused(gpt2):
    with gpt2.trace(SOURCE):
        hidden = gpt2.transformer.h[1].output
    with pytest.raises(ValueError, match=r"same model\.session"):
        with gpt2.trace(PROMPT):
            gpt2.transformer.h[1].output[:] = hidden


def test_named_fields_of_topk(gpt2):
    with gpt2.trace(SOURCE):
        top = gpt2.lm_head.output[0, -1].topk(3)
        indices = top.indices.save()
        values = top.values.save()
    expected = gpt2._module(ids(gpt2, SOURCE)).logits[0, -1].topk(3)
    assert torch.equal(indices.value, expected.indices)
    assert torch.allclose(values.value, expected.values, atol=1e-6)


def test_a_session_patching_every_layer_of_a_deep_model_fits_and_the_limit_names_both_counts(gpt2):
    from nnfabric.graph import Graph, Invoke, LimitExceeded, Limits, Node
    from nnfabric.graph.validate import validate_session

    def trace():
        g = Graph()
        g.invokes.append(Invoke(args=["Paris"]))
        g.add(Node("output", ["lm_head", 0, 0]))
        return g

    validate_session([trace() for _ in range(31)], Limits())  # 1 clean + 30 patched traces
    with pytest.raises(LimitExceeded, match="at most 8 traces, this one has 9"):
        validate_session([trace() for _ in range(9)], Limits(max_traces=8))
