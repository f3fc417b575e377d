"""model.sweep() run here: every trace inside is its own job, run when the sweep ends, checked
against hand-written hooks; a failing job is reported and the others still deliver."""

from __future__ import annotations

import pytest
import torch

from tests.support.oracles import Hook, ids, plain_logits

PROMPT = "The Eiffel Tower is in the city of"


def zeroed_logits(gpt2, layer: int, position: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The oracle: layer `layer`'s output zeroed at `position` by a plain forward hook."""

    def edit(output):  # type: ignore[no-untyped-def]
        (output[0] if isinstance(output, tuple) else output)[:, position] = 0

    with Hook(gpt2._module.transformer.h[layer], edit):
        return plain_logits(gpt2, PROMPT)[:, -1]


def test_a_local_sweep_runs_each_trace_as_its_own_job(gpt2):
    positions = ids(gpt2, PROMPT).shape[1]
    logits = {}
    with gpt2.sweep(remote=False, progress=False) as sweep:
        for layer in range(2):
            for position in range(positions):
                with gpt2.trace(PROMPT):
                    gpt2.transformer.h[layer].output[:, position] = 0
                    logits[layer, position] = gpt2.lm_head.output[:, -1].save()
        with pytest.raises(ValueError):
            _ = logits[0, 0].value  # recorded, not run: the sweep runs its jobs when it ends
    assert len(sweep) == 2 * positions and not sweep.failed
    for (layer, position), proxy in logits.items():
        assert torch.allclose(proxy.value, zeroed_logits(gpt2, layer, position), atol=1e-5)
    assert not torch.allclose(logits[0, positions - 1].value, logits[1, 0].value)  # each its own edit


def test_a_failed_job_in_a_sweep_is_reported_and_the_others_deliver(gpt2):
    saved = []
    with gpt2.sweep(remote=False, progress=False) as sweep:
        for position in (0, 999, 1):  # no position 999: that job fails when it runs
            with gpt2.trace(PROMPT):
                gpt2.transformer.h[0].output[:, position] = 0
                saved.append(gpt2.lm_head.output[:, -1].save())
    assert [index for index, _ in sweep.failed] == [1]
    with pytest.raises(ValueError, match="job failed"):
        _ = saved[1].value
    assert torch.allclose(saved[0].value, zeroed_logits(gpt2, 0, 0), atol=1e-5)
    assert torch.allclose(saved[2].value, zeroed_logits(gpt2, 0, 1), atol=1e-5)


def test_sweeps_do_not_nest_and_open_outside_traces(gpt2):
    with gpt2.sweep(remote=False, progress=False):
        with pytest.raises(RuntimeError, match="sweep"):
            gpt2.sweep(remote=False).__enter__()
    with gpt2.trace(PROMPT):
        with pytest.raises(RuntimeError, match="outside any trace"):
            gpt2.sweep(remote=False).__enter__()
        gpt2.lm_head.output.save()
