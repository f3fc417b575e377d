"""Errors name the problem and point at the user's own line, with a traceback that ends there."""

import traceback
from pathlib import Path

import nnfabric
import pytest
import torch

from tests.support.oracles import hooks_of

PROMPT = "The Eiffel Tower is in the city of"


def line_of(error: BaseException) -> int:
    return traceback.extract_tb(error.__traceback__)[-1].lineno


def test_shape_error_points_at_the_users_line(gpt2):
    with pytest.raises(nnfabric.InterventionError) as info:
        with gpt2.trace(PROMPT):
            h = gpt2.transformer.h[0].output
            h.view(7, 13).save()  # the bad line
    source = Path(__file__).read_text().splitlines()
    bad = next(i for i, text in enumerate(source, 1) if "# the bad line" in text and "h.view" in text)
    assert line_of(info.value) == bad
    assert "RuntimeError" in str(info.value) and f"line {bad}" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_out_of_order_reads_fail_fast(gpt2):
    with pytest.raises(nnfabric.InterventionError, match="order the model calls them") as info:
        with gpt2.trace(PROMPT):
            gpt2.transformer.h[1].output.save()
            gpt2.transformer.h[0].output.save()  # out of order
    assert "out of order" in str(info.value)


def test_a_value_used_before_the_model_produces_it(gpt2):
    with pytest.raises(nnfabric.InterventionError, match="not available yet"):
        with gpt2.trace() as tracer:
            with tracer.invoke(PROMPT):
                late = gpt2.transformer.h[1].output[:, -1]
            with tracer.invoke(PROMPT):
                gpt2.transformer.h[0].output[:, -1] = late


def test_a_module_call_that_never_happens(gpt2):
    with pytest.raises(nnfabric.InterventionError, match="never happened"):
        with gpt2.trace(PROMPT):
            gpt2.transformer.h[0].next().output.save()


def test_disallowed_torch_function_is_refused_at_its_line(gpt2):
    with pytest.raises(TypeError, match="not an allowed operation"):
        with gpt2.trace(PROMPT):
            torch.fft.fft(gpt2.transformer.h[0].output)


def test_python_control_flow_on_a_proxy_explains_itself(gpt2):
    with pytest.raises(TypeError, match=r"torch\.where"):
        with gpt2.trace(PROMPT):
            if gpt2.transformer.h[0].output.sum() > 0:
                pass


def test_unsaved_values_say_so(gpt2):
    with gpt2.trace(PROMPT):
        h = gpt2.transformer.h[0].output
    with pytest.raises(ValueError, match=r"call \.save\(\)"):
        h.value  # noqa: B018


def test_bad_index_is_reported_with_its_line(gpt2):
    with pytest.raises(nnfabric.InterventionError, match="IndexError") as info:
        with gpt2.trace(PROMPT):
            gpt2.transformer.h[0].output[5].save()
    assert "output[5]" in str(info.value)


def test_model_is_clean_after_a_failed_trace(gpt2):
    before = hooks_of(gpt2._module)
    with pytest.raises(nnfabric.InterventionError):
        with gpt2.trace(PROMPT):
            gpt2.transformer.h[0].output[:] = 0
            gpt2.transformer.h[1].output.view(3, 3, 3).save()
    assert hooks_of(gpt2._module) == before
    with gpt2.trace(PROMPT):
        logits = gpt2.output.logits.save()
    with torch.no_grad():
        expected = gpt2._module(torch.tensor([gpt2.tokenizer(PROMPT)["input_ids"]])).logits
    assert torch.equal(logits.value, expected)
