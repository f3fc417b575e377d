"""The worker's batch executor, without Ray: merging, failure isolation, limits, clean state."""

import torch
from nnfabric.graph import Graph, Invoke, Node, Ref
from nnfabric.runtime.wire import pack_request, unpack_result

from services.common.catalog import ModelLimits, ModelSpec
from services.worker.executor import BatchExecutor
from tests.support.oracles import hooks_of, plain_logits

PROMPTS = ["The Eiffel Tower is in the city of", "Alice went to the market", "One two three"]


def job(prompt, edit_layer=None, bad=False):
    g = Graph()
    g.invokes.append(Invoke(args=[prompt]))
    if edit_layer is not None:
        g.add(Node("output", [f"transformer.h.{edit_layer}", 0, 0]))
        g.add(Node("binary", ["mul", Ref(0), 0.0]))
        g.add(Node("set_output", [f"transformer.h.{edit_layer}", 0, 0, Ref(1)]))
    out = g.add(Node("output", ["", 0, 0]))
    logits = g.add(Node("getattr", [Ref(out.id), "logits"]))
    g.saves.append(logits.id)
    if bad:
        g.add(Node("getitem", [Ref(logits.id), 9]))
    return pack_request(g, {})


def executor(gpt2, **limits):
    spec = ModelSpec(name="tiny", source="x", limits=ModelLimits(**limits))
    return BatchExecutor(spec, gpt2._module, gpt2.tokenizer)


def logits_of(outcome):
    assert outcome.ok, outcome.error
    (value,) = unpack_result(outcome.result).values()
    return value


SAME_WIDTH = ["The Eiffel Tower is in the city of", "The Colosseum is in the city of Rome", "Alice went to the shop"]


def test_merged_batch_matches_each_prompt_alone(gpt2):
    assert len({len(gpt2.tokenizer(p)["input_ids"]) for p in SAME_WIDTH}) == 1
    ex = executor(gpt2)
    calls = []
    handle = gpt2._module.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        outcomes = ex.run([(str(i), job(p)) for i, p in enumerate(SAME_WIDTH)])
    finally:
        handle.remove()
    assert len(calls) == 1  # one forward pass for three users' jobs
    for i, prompt in enumerate(SAME_WIDTH):
        assert torch.allclose(logits_of(outcomes[str(i)]), plain_logits(gpt2, prompt), atol=1e-5)


def position_edit(prompt):
    """Zero the first token's hidden state after layer 0 (a position index, as patching uses)."""
    g = Graph()
    g.invokes.append(Invoke(args=[prompt]))
    h = g.add(Node("output", ["transformer.h.0", 0, 0]))
    g.add(Node("setitem", [Ref(h.id), (slice(None), 0), 0.0]))
    out = g.add(Node("output", ["", 0, 0]))
    logits = g.add(Node("getattr", [Ref(out.id), "logits"]))
    g.saves.append(logits.id)
    return pack_request(g, {})


def test_a_position_index_means_the_same_token_whatever_the_batch_mates_prompts(gpt2):
    # Prompts of other lengths share its forward pass; `h[:, 0]` is still its own first token.
    ex = executor(gpt2)
    alone = logits_of(ex.run([("a", position_edit(PROMPTS[2]))])["a"])
    outcomes = ex.run([("a", position_edit(PROMPTS[2])), ("b", job(PROMPTS[0])), ("c", job(PROMPTS[1]))])
    assert outcomes["a"].shared == 3
    assert torch.allclose(logits_of(outcomes["a"]), alone, atol=1e-5)
    hook = gpt2._module.transformer.h[0].register_forward_hook(lambda m, a, o: o.index_fill(1, torch.tensor([0]), 0.0))
    try:
        expected = plain_logits(gpt2, PROMPTS[2])
    finally:
        hook.remove()
    assert torch.allclose(alone, expected, atol=1e-6)


def test_one_failing_job_leaves_its_batch_mates_correct_and_the_model_clean(gpt2):
    ex = executor(gpt2)
    hooks_before = hooks_of(gpt2._module)
    outcomes = ex.run(
        [("good", job(PROMPTS[0], edit_layer=0)), ("bad", job(PROMPTS[1], bad=True)), ("other", job(PROMPTS[2]))]
    )
    assert not outcomes["bad"].ok and "IndexError" in outcomes["bad"].error and outcomes["bad"].node == 2
    handle = gpt2._module.transformer.h[0].register_forward_hook(lambda m, a, o: o * 0)
    try:
        edited = plain_logits(gpt2, PROMPTS[0])
    finally:
        handle.remove()
    # The others share a pass again without it (prompts of other lengths: equal to about 1e-7).
    assert outcomes["good"].shared == outcomes["other"].shared == 2
    assert torch.allclose(logits_of(outcomes["good"]), edited, atol=1e-5)
    assert torch.allclose(logits_of(outcomes["other"]), plain_logits(gpt2, PROMPTS[2]), atol=1e-5)
    assert hooks_of(gpt2._module) == hooks_before
    assert all(p.grad is None for p in gpt2._module.parameters())
    again = ex.run([("after", job(PROMPTS[1]))])
    assert torch.equal(logits_of(again["after"]), plain_logits(gpt2, PROMPTS[1]))


def test_limits_fail_the_job_with_a_reason(gpt2):
    small = executor(gpt2, max_saved_bytes=100)
    assert "over this model's limit of 100" in small.run([("a", job(PROMPTS[0]))])["a"].error
    few_nodes = executor(gpt2, max_nodes=1)
    assert "invalid graph" in few_nodes.run([("a", job(PROMPTS[0]))])["a"].error
    slow = executor(gpt2, timeout_s=1e-9)
    assert "time limit" in slow.run([("a", job(PROMPTS[0], edit_layer=1))])["a"].error


def _graph_of(*nodes, prompt=PROMPTS[0]):
    g = Graph()
    g.invokes.append(Invoke(args=[prompt]))
    for node in nodes:
        g.add(node)
    g.saves.append(len(nodes) - 1)
    return pack_request(g, {})


def test_the_deadline_holds_between_nodes_with_no_hook_to_check_it(gpt2):
    slow = executor(gpt2, timeout_s=1e-9)
    job = _graph_of(Node("call_function", ["torch.ones", 3]), Node("call_method", ["sum", Ref(0)]))
    assert "time limit" in slow.run([("a", job)])["a"].error


def test_python_values_are_bounded_before_they_are_built(gpt2):
    import time

    ex = executor(gpt2)
    start = time.perf_counter()
    power = ex.run([("a", _graph_of(Node("binary", ["pow", 3, 3 * 10**7])))])["a"]
    assert "over this fabric's limit" in power.error and time.perf_counter() - start < 1.0
    text = ex.run([("a", _graph_of(Node("binary", ["mul", "ab", 10**9])))])["a"]
    assert "over this fabric's limit" in text.error
    huge = ex.run([("a", _graph_of(Node("call_function", ["torch.zeros", 1 << 20, 1 << 20])))])["a"]
    assert "over this fabric's limit" in huge.error


def test_every_saved_byte_counts_against_the_limit(gpt2):
    ex = executor(gpt2, max_saved_bytes=1_000_000)
    listed = _graph_of(Node("call_function", ["torch.zeros", 1000, 1000]), Node("call_method", ["tolist", Ref(0)]))
    outcome = ex.run([("a", listed)])["a"]
    assert not outcome.ok and "over this model's limit of 1000000" in outcome.error


def test_a_prompt_over_the_string_limit_is_refused_before_tokenizing(gpt2):
    ex = executor(gpt2)
    outcome = ex.run([("a", _graph_of(Node("output", ["", 0, 0]), prompt="word " * 700_000))])["a"]
    assert "invalid graph" in outcome.error and "characters" in outcome.error


def attention_weights_job(prompt):
    g = Graph()
    g.invokes.append(Invoke(args=[prompt]))
    out = g.add(Node("output", ["transformer.h.0.attn", 0, 0]))
    g.saves.append(g.add(Node("getitem", [Ref(out.id), 1])).id)
    return pack_request(g, {})


def test_a_job_reading_attention_weights_runs_eager_without_changing_its_batch_mates(gpt2, gpt2_dir):
    from tests.unit.test_methods import eager_module_outputs

    ex = executor(gpt2)
    alone = {p: logits_of(ex.run([("solo", job(p))])["solo"]) for p in SAME_WIDTH[:2]}
    calls = []
    handle = gpt2._module.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        outcomes = ex.run([("a", job(SAME_WIDTH[0])), ("w", attention_weights_job(SAME_WIDTH[2])),
                           ("b", job(SAME_WIDTH[1]))])  # fmt: skip
    finally:
        handle.remove()
    assert len(calls) == 2  # the plain jobs share a (fused) pass; the weights job has an eager one
    assert torch.equal(logits_of(outcomes["a"]), alone[SAME_WIDTH[0]])
    assert torch.equal(logits_of(outcomes["b"]), alone[SAME_WIDTH[1]])
    expected = eager_module_outputs(gpt2_dir, SAME_WIDTH[2], ["transformer.h.0.attn"])["transformer.h.0.attn"][1]
    assert torch.allclose(logits_of(outcomes["w"]), expected, atol=1e-6)


def exact(envelope_job: bytes) -> bytes:
    """The same job, asking to run alone."""
    from nnfabric.graph.codec import decode_request
    from nnfabric.graph.validate import Limits

    (graph,), _ = decode_request(envelope_job, Limits())
    graph.options["exact"] = True
    return pack_request(graph, {})


def test_an_exact_job_runs_alone_and_equals_its_solo_run_while_others_merge(gpt2):
    ex = executor(gpt2)
    solo = logits_of(ex.run([("solo", job(SAME_WIDTH[2], edit_layer=1))])["solo"])
    calls = []
    handle = gpt2._module.register_forward_hook(lambda m, a, o: calls.append(o.logits.shape[0]))
    try:
        outcomes = ex.run([("a", job(SAME_WIDTH[0])), ("exact", exact(job(SAME_WIDTH[2], edit_layer=1))),
                           ("b", job(SAME_WIDTH[1]))])  # fmt: skip
    finally:
        handle.remove()
    assert sorted(calls) == [1, 2]  # the two others shared a pass; the exact job had one of its own
    assert torch.equal(logits_of(outcomes["exact"]), solo)
    for name, prompt in (("a", SAME_WIDTH[0]), ("b", SAME_WIDTH[1])):
        assert torch.allclose(logits_of(outcomes[name]), plain_logits(gpt2, prompt), atol=1e-5)
