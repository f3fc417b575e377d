"""Strangers in one forward pass: a hostile job batched with an honest one, on the real executor.

For each way a job could reach into another's rows, the honest job's result must equal its
solo run (the oracle: the plain model through a hand-written hook, or no hook at all), and the
model's weights and the replica's random state must be as they were.
"""

from __future__ import annotations

import pytest
import torch
from nnfabric.graph import DType, Graph, Invoke, Node, Ref, TensorRef
from nnfabric.runtime.wire import pack_request, unpack_result

from services.common.catalog import ModelLimits, ModelSpec
from services.worker.executor import BatchExecutor
from tests.support.oracles import hooks_of, plain_logits

HONEST = "The Eiffel Tower is in the city of"
OTHER = "The Colosseum is in the city of Rome"  # as many tokens as HONEST (8): no padding in the batch


def test_the_two_prompts_need_no_padding(gpt2):
    # Without padding, position embeddings have no batch dimension: the shared-value cases below.
    assert len(gpt2.tokenizer(HONEST)["input_ids"]) == len(gpt2.tokenizer(OTHER)["input_ids"])


def executor(gpt2, **limits):
    spec = ModelSpec(name="tiny", source="x", limits=ModelLimits(**limits))
    return BatchExecutor(spec, gpt2._module, gpt2.tokenizer)


def honest_job():
    g = Graph()
    g.invokes.append(Invoke(args=[HONEST]))
    out = g.add(Node("output", ["", 0, 0]))
    logits = g.add(Node("getattr", [Ref(out.id), "logits"]))
    g.saves.append(logits.id)
    return g


def graph(prompt=OTHER, invoke=None, options=None):
    g = Graph(options=options or {})
    g.invokes.append(invoke or Invoke(args=[prompt]))
    return g


def hostile_whole_batch_invoke():
    g = graph(invoke=Invoke(args=None, kwargs={"input_ids": [[5, 6, 7]]}))
    h = g.add(Node("output", ["transformer.h.1", 0, 0]))
    g.add(Node("set_output", ["lm_head", 0, 0, Ref(h.id)]))
    g.saves.append(h.id)
    return g, {}


def hostile_out_argument():
    g = graph()
    h = g.add(Node("output", ["transformer.h.0", 0, 0]))
    first = g.add(Node("getitem", [Ref(h.id), 0]))
    g.add(Node("call_function", ["torch.zeros_like", Ref(first.id)], {"out": Ref(first.id)}))
    return g, {}


def hostile_write_to_a_shared_value():
    g = graph()  # position embeddings have no batch dimension here: [1, seq, width]
    wpe = g.add(Node("output", ["transformer.wpe", 0, 0]))
    zero = g.add(Node("binary", ["mul", Ref(wpe.id), 0.0]))
    g.add(Node("set_output", ["transformer.wpe", 0, 0, Ref(zero.id)]))
    return g, {}


def hostile_setitem_into_a_shared_value():
    g = graph()
    wpe = g.add(Node("output", ["transformer.wpe", 0, 0]))
    g.add(Node("setitem", [Ref(wpe.id), slice(None), 1000.0]))
    return g, {}


def hostile_in_place_on_a_shared_value():
    g = graph()
    wpe = g.add(Node("output", ["transformer.wpe", 0, 0]))
    g.add(Node("call_method", ["zero_", Ref(wpe.id)]))
    return g, {}


def hostile_reads_every_input():
    g = graph()
    inputs = g.add(Node("inputs", ["transformer.h.0", 0, 0]))
    g.saves.append(inputs.id)
    return g, {}


def hostile_seed_and_random():
    g = graph(options={"seed": 1234})
    h = g.add(Node("output", ["transformer.h.0", 0, 0]))
    first = g.add(Node("getitem", [Ref(h.id), 0]))
    noise = g.add(Node("call_function", ["torch.rand_like", Ref(first.id)]))
    g.saves.append(noise.id)
    return g, {}


def hostile_unencodable_save():
    g = graph()
    out = g.add(Node("output", ["", 0, 0]))
    g.saves.append(out.id)
    dtype = g.add(Node("literal", [DType("float32")]))
    g.saves.append(dtype.id)
    return g, {}


def hostile_huge_tensor():
    g = graph()
    big = g.add(Node("call_function", ["torch.zeros", 1 << 20, 1 << 20]))
    g.saves.append(big.id)
    return g, {}


def hostile_tensor_input():
    g = graph()
    g.add(Node("set_output", ["transformer.h.0", 0, 0, (TensorRef("t0"),)]))
    return g, {"t0": torch.full((1, 8, 64), 1e6)}


HOSTILE = [
    hostile_whole_batch_invoke,
    hostile_out_argument,
    hostile_write_to_a_shared_value,
    hostile_setitem_into_a_shared_value,
    hostile_in_place_on_a_shared_value,
    hostile_reads_every_input,
    hostile_seed_and_random,
    hostile_unencodable_save,
    hostile_huge_tensor,
    hostile_tensor_input,
]


@pytest.mark.parametrize("make", HOSTILE, ids=lambda f: f.__name__)
def test_a_hostile_batch_mate_cannot_change_or_read_the_honest_job(gpt2, make):
    ex = executor(gpt2)
    weights = {k: v.clone() for k, v in gpt2._module.state_dict().items()}
    rng = torch.get_rng_state()
    hooks = hooks_of(gpt2._module)
    hostile, tensors = make()
    outcomes = ex.run([("hostile", pack_request(hostile, tensors)), ("honest", pack_request(honest_job(), {}))])
    honest = outcomes["honest"]
    assert honest.ok, honest.error
    (logits,) = unpack_result(honest.result).values()
    assert torch.allclose(logits, plain_logits(gpt2, HONEST), atol=1e-5), "the honest job's logits changed"
    assert all(torch.equal(v, gpt2._module.state_dict()[k]) for k, v in weights.items()), "weights changed"
    assert torch.equal(torch.get_rng_state(), rng), "the replica's random state changed"
    assert hooks_of(gpt2._module) == hooks, "hooks were left on the model"
    hostile_outcome = outcomes["hostile"]
    if make is hostile_reads_every_input:
        assert hostile_outcome.ok, hostile_outcome.error
        for value in unpack_result(hostile_outcome.result).values():
            _assert_only_own_rows(value)


def _assert_only_own_rows(value):
    """Whatever the hostile job got back holds one row (its own), never the honest job's."""
    if isinstance(value, torch.Tensor):
        assert value.dim() == 0 or value.shape[0] == 1, tuple(value.shape)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _assert_only_own_rows(item)
    elif isinstance(value, dict):
        for item in value.values():
            _assert_only_own_rows(item)


def test_hostile_jobs_fail_with_their_own_reason(gpt2):
    ex = executor(gpt2)
    cases = {"out": hostile_out_argument, "whole": hostile_whole_batch_invoke, "huge": hostile_huge_tensor}
    jobs = [(name, pack_request(*make())) for name, make in cases.items()]
    outcomes = ex.run([*jobs, ("honest", pack_request(honest_job(), {}))])
    assert "out= argument is not allowed" in outcomes["out"].error
    assert "whole batch" in outcomes["whole"].error
    assert "over this fabric's limit" in outcomes["huge"].error
    assert outcomes["honest"].ok


def test_a_write_to_a_shared_value_still_works_for_its_owner_alone(gpt2):
    """Merging is refused for it, not the edit: run alone, the owner's edit takes effect."""
    ex = executor(gpt2)
    edit = Graph()
    edit.invokes.append(Invoke(args=[HONEST]))
    w = edit.add(Node("output", ["transformer.wpe", 0, 0]))
    edit.add(Node("setitem", [Ref(w.id), slice(None), 0.0]))
    out = edit.add(Node("output", ["", 0, 0]))
    logits = edit.add(Node("getattr", [Ref(out.id), "logits"]))
    edit.saves.append(logits.id)
    outcomes = ex.run([("edit", pack_request(edit, {})), ("honest", pack_request(honest_job(), {}))])

    def zero(module, args, output):
        return output * 0

    handle = gpt2._module.transformer.wpe.register_forward_hook(zero)
    try:
        expected = plain_logits(gpt2, HONEST)
    finally:
        handle.remove()
    (edited,) = unpack_result(outcomes["edit"].result).values()
    assert torch.allclose(edited, expected, atol=1e-5)
    assert not torch.allclose(edited, plain_logits(gpt2, HONEST), atol=1e-3)  # the edit did something


def test_honest_jobs_still_share_one_forward_pass(gpt2):
    ex = executor(gpt2)
    calls = []
    handle = gpt2._module.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        g = graph()
        h = g.add(Node("output", ["transformer.h.1", 0, 0]))
        g.saves.append(h.id)
        outcomes = ex.run([("a", pack_request(g, {})), ("b", pack_request(honest_job(), {}))])
    finally:
        handle.remove()
    assert len(calls) == 1 and outcomes["a"].ok and outcomes["b"].ok


def test_a_seeded_job_is_reproducible_and_leaves_no_trace(gpt2):
    ex = executor(gpt2)
    before = torch.get_rng_state()
    first = unpack_result(ex.run([("a", pack_request(*hostile_seed_and_random()))])["a"].result)
    second = unpack_result(ex.run([("a", pack_request(*hostile_seed_and_random()))])["a"].result)
    assert torch.equal(*first.values(), *second.values())
    assert torch.equal(torch.get_rng_state(), before)
    # Unseeded jobs are not predictable from a seed anyone chose.
    g = graph()
    h = g.add(Node("output", ["transformer.h.0", 0, 0]))
    first_h = g.add(Node("getitem", [Ref(h.id), 0]))
    noise = g.add(Node("call_function", ["torch.rand_like", Ref(first_h.id)]))
    g.saves.append(noise.id)
    runs = [unpack_result(ex.run([("x", pack_request(g, {}))])["x"].result)[noise.id] for _ in range(2)]
    assert not torch.equal(runs[0], runs[1])
