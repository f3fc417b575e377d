"""Merging for real traffic, on the real executor: prompts of any length share one forward pass,
generations of any lengths and `max_new_tokens` share one generation, jobs join a generation
that is running and leave it when done. Every job is checked against its solo run on the plain
model with hand-written hooks (the oracle), including beside hostile batch-mates."""

from __future__ import annotations

import re
import threading

import pytest
import torch
from nnfabric.graph import Graph, Invoke, Node, Ref
from nnfabric.runtime.wire import pack_request, unpack_result

from services.common.catalog import ModelLimits, ModelSpec
from services.worker.executor import BatchExecutor
from tests.unit.test_batched_generate import PROMPTS, STEER, executor, gen_job, hf_generate, values
from tests.unit.test_source import FAMILIES

LENGTHS = [3, 9, 5, 12, 7]  # prompt lengths of the jobs sharing a pass (token ids)
SCALE = 2.0


def _model(family, gpt2, llama):  # type: ignore[no-untyped-def]
    return {"gpt2": lambda: gpt2._module, "llama": lambda: llama._module}.get(family, FAMILIES.get(family))()


def _layer(model) -> str:  # type: ignore[no-untyped-def]
    return next(name for name, _ in model.named_modules() if re.search(r"(layers|\.h)\.0$", name))


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 90, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _patch_job(layer: str, ids: list[int], tuple_output: bool) -> bytes:
    """A patching job as a researcher writes it: zero its first token's hidden state, scale its
    last one, save that layer's output and the logits."""
    g = Graph()
    g.invokes.append(Invoke(args=[ids]))
    out = g.add(Node("output", [layer, 0, 0]))
    h = g.add(Node("getitem", [Ref(out.id), 0])) if tuple_output else out
    g.add(Node("setitem", [Ref(h.id), (slice(None), 0), 0.0]))
    last = g.add(Node("getitem", [Ref(h.id), (slice(None), -1)]))
    g.add(Node("setitem", [Ref(h.id), (slice(None), -1), Ref(g.add(Node("binary", ["mul", Ref(last.id), SCALE])).id)]))
    saved = g.add(Node("call_method", ["clone", Ref(h.id)]))
    final = g.add(Node("output", ["", 0, 0]))
    logits = g.add(Node("getattr", [Ref(final.id), "logits"]))
    g.saves.extend([saved.id, logits.id])
    return pack_request(g, {})


def _oracle(model, layer: str, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The job alone on the plain model, its edit as a hand-written forward hook."""
    seen = {}

    def hook(module, args, output):  # type: ignore[no-untyped-def]
        h = (output[0] if isinstance(output, tuple) else output).clone()
        h[:, 0] = 0.0
        h[:, -1] = h[:, -1] * SCALE
        seen["h"] = h
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits
    finally:
        handle.remove()
    return seen["h"], logits


def _counted(model, run):  # type: ignore[no-untyped-def]
    """`run()` and the batch size of every forward pass of the model meanwhile."""
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda m, a, k: sizes.append(int((a[0] if a else k["input_ids"]).shape[0])), with_kwargs=True
    )
    try:
        return run(), sizes
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["gpt2", "llama", *FAMILIES])
def test_traces_of_any_lengths_share_one_forward_pass_and_each_sees_its_own_tokens(family, gpt2, llama):
    model = _model(family, gpt2, llama)
    layer = _layer(model)
    with torch.no_grad():
        probe = model.get_submodule(layer)
        found = []
        handle = probe.register_forward_hook(lambda m, a, o: found.append(isinstance(o, tuple)))
        model(torch.tensor([[5, 6]]))
        handle.remove()
    ex = BatchExecutor(ModelSpec(name="tiny", source="x", limits=ModelLimits()), model, None)
    prompts = [_prompt(n, seed) for seed, n in enumerate(LENGTHS)]
    outcomes, sizes = _counted(model, lambda: ex.run([(str(i), _patch_job(layer, p, found[0])) for i, p in enumerate(prompts)]))
    assert sizes == [len(prompts)]  # one forward pass for five lengths
    for i, ids in enumerate(prompts):
        outcome = outcomes[str(i)]
        assert outcome.ok, outcome.error
        assert outcome.shared == len(prompts)
        hidden, logits = unpack_result(outcome.result).values()
        expected_hidden, expected_logits = _oracle(model, layer, ids)
        assert hidden.shape == expected_hidden.shape and logits.shape == expected_logits.shape
        torch.testing.assert_close(hidden, expected_hidden, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-4)


def _hostile_trace(layer: str, ids: list[int], kind: str) -> bytes:
    g = Graph()
    g.invokes.append(Invoke(args=[ids]))
    h = g.add(Node("output", [layer, 0, 0]))
    if kind == "past_its_length":
        g.add(Node("setitem", [Ref(h.id), (slice(None), len(ids) + 2), 1.0]))  # a column of a longer batch-mate
    elif kind == "huge":
        g.add(Node("setitem", [Ref(h.id), (slice(None), slice(None)), 1e30]))
    final = g.add(Node("output", ["", 0, 0]))
    g.saves.append(g.add(Node("getattr", [Ref(final.id), "logits"])).id)
    return pack_request(g, {})


@pytest.mark.parametrize("kind", ["past_its_length", "huge"])
def test_a_hostile_job_of_another_length_changes_nothing_of_its_batch_mates(kind, llama):
    model = llama._module
    layer = _layer(model)
    ex = BatchExecutor(ModelSpec(name="tiny", source="x", limits=ModelLimits()), model, None)
    short = _prompt(3, 99)
    prompts = [_prompt(n, seed) for seed, n in enumerate(LENGTHS)]
    jobs = [("hostile", _hostile_trace(layer, short, kind))] + [(str(i), _patch_job(layer, p, False)) for i, p in enumerate(prompts)]
    outcomes, sizes = _counted(model, lambda: ex.run(jobs))
    if kind == "past_its_length":
        assert not outcomes["hostile"].ok and "IndexError" in (outcomes["hostile"].error or "")
        # It fails alone, as it would; the others share a pass again (they do not all run alone).
        assert sizes == [len(jobs), 1, len(jobs) - 1]
    else:
        assert sizes == [len(jobs)]
    for i, ids in enumerate(prompts):
        _hidden, logits = unpack_result(outcomes[str(i)].result).values()
        _expected_hidden, expected_logits = _oracle(model, layer, ids)
        torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-4)


MIXED = ["Hi", "The Eiffel Tower is in the city of", "Alice went", "One two three four five six seven eight nine ten"]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generations_of_any_lengths_share_one_generation_and_finished_jobs_stop_costing(name, gpt2, llama):
    model = {"gpt2": gpt2, "llama": llama}[name]
    ex = executor(model)
    news = [2, 7, 4, 5]
    jobs = [(str(i), gen_job(model, p, n, steer=STEER if i % 2 else None)) for i, (p, n) in enumerate(zip(MIXED, news, strict=True))]
    outcomes, sizes = _counted(model._module, lambda: ex.run(jobs))
    assert len(sizes) == max(news)  # one prefill, then one step per token of the longest
    # Each job leaves when done: the batch shrinks as the shorter generations end.
    assert sizes == [sum(1 for n in news if n > step) for step in range(max(news))]
    for i, (prompt, n) in enumerate(zip(MIXED, news, strict=True)):
        ids, _ = values(outcomes[str(i)])
        assert torch.equal(ids, hf_generate(model, prompt, n, steer=STEER if i % 2 else None)), prompt


def test_a_generate_job_joins_a_running_generation_and_equals_its_solo_run(llama):
    ex = executor(llama)
    long_job = ("long", gen_job(llama, MIXED[3], 40, steer=STEER))
    late_job = ("late", gen_job(llama, MIXED[0], 3))
    decoded, _ = ex.prepare([long_job])
    late, _ = ex.prepare([late_job])
    finished: dict = {}
    thread = threading.Thread(target=lambda: finished.update(ex.run_decoded(decoded)))
    sizes: list[int] = []
    reached, go = threading.Event(), threading.Event()

    def pass_begins(module, args, kwargs):  # type: ignore[no-untyped-def]
        sizes.append(int((args[0] if args else kwargs["input_ids"]).shape[0]))
        if len(sizes) == 3:  # the long job's third step: the late job arrives now
            reached.set()
            assert go.wait(60)

    handle = llama._module.register_forward_pre_hook(pass_begins, with_kwargs=True)
    try:
        thread.start()
        assert reached.wait(60)
        futures = ex.join(late)
        go.set()
        assert list(futures) == ["late"]
        outcome = futures["late"].result(timeout=120)
        thread.join(timeout=120)
    finally:
        go.set()
        handle.remove()
    assert outcome.ok, outcome.error
    assert outcome.shared == 2
    ids, _ = values(outcome)
    assert torch.equal(ids, hf_generate(llama, MIXED[0], 3))
    long_ids, _ = values(finished["long"])
    assert torch.equal(long_ids, hf_generate(llama, MIXED[3], 40, steer=STEER))
    # The late job's prefill ran on its rows only, then it shared 2 steps, then it left.
    assert sizes == [1, 1, 1, 1, 2, 2] + [1] * 35  # the long job's 40 passes and the late prefill


@pytest.mark.parametrize("hostile", ["fails_at_a_step", "huge", "past_its_length"])
def test_hostile_generate_jobs_of_other_lengths_leave_their_batch_mates_as_alone(hostile, llama):
    ex = executor(llama)
    layer = "model.layers.0"
    g = Graph(kind="generate", options={"max_new_tokens": 5})
    g.invokes.append(Invoke(args=[MIXED[2]]))
    for step in range(5):
        h = g.add(Node("output", [layer, step, 0]))
        if hostile == "huge":
            g.add(Node("set_output", [layer, step, 0, Ref(g.add(Node("binary", ["mul", Ref(h.id), 1e30])).id)]))
        elif hostile == "fails_at_a_step" and step == 3:
            g.add(Node("getitem", [Ref(h.id), 99]))
        elif hostile == "past_its_length" and step == 0:
            g.add(Node("setitem", [Ref(h.id), (slice(None), 6), 1.0]))  # its prompt has 4 tokens
    g.saves.append(g.add(Node("model_output", [])).id)
    jobs = [("hostile", pack_request(g, {}))]
    news = [6, 3, 4]
    honest = [MIXED[1], MIXED[3], MIXED[0]]
    jobs += [(str(i), gen_job(llama, p, n, steer=STEER)) for i, (p, n) in enumerate(zip(honest, news, strict=True))]
    outcomes = ex.run(jobs)
    if hostile != "huge":
        assert not outcomes["hostile"].ok and "IndexError" in (outcomes["hostile"].error or "")
    for i, (prompt, n) in enumerate(zip(honest, news, strict=True)):
        assert outcomes[str(i)].shared == 4
        ids, _ = values(outcomes[str(i)])
        assert torch.equal(ids, hf_generate(llama, prompt, n, steer=STEER)), prompt


def _attention_job(prompt: str, n: int) -> bytes:
    g = Graph(kind="generate", options={"max_new_tokens": n})
    g.invokes.append(Invoke(args=[prompt]))
    for step in range(n):
        g.saves.append(g.add(Node("output", ["transformer.h.0.attn", step, 0])).id)
    g.saves.append(g.add(Node("model_output", [])).id)
    return pack_request(g, {})


def test_a_job_among_others_reads_its_own_keys_at_every_step(gpt2):
    """A job's reads of the whole sequence (attention weights at each step) cover its own keys
    only, as many as it has tokens at that step, as alone (the oracle: eager attention and
    `output_attentions` on the plain model, which runs the job alone)."""
    ex = executor(gpt2)
    merged = ex.run([("a", _attention_job(PROMPTS[2], 3)), ("b", _attention_job(MIXED[3], 5)),
                     ("c", _attention_job(MIXED[0], 2))])  # fmt: skip
    assert merged["a"].shared == 3
    saved = list(unpack_result(merged["a"].result).values())
    ids = torch.tensor([gpt2.tokenizer(PROMPTS[2])["input_ids"]])
    module = gpt2._module
    current = module.config._attn_implementation
    module.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            expected = module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                                       pad_token_id=gpt2.tokenizer.pad_token_id, output_attentions=True,
                                       return_dict_in_generate=True)  # fmt: skip
    finally:
        module.set_attn_implementation(current)
    assert torch.equal(saved[-1], expected.sequences)
    for step in range(3):
        weights = saved[step][1]
        assert weights.shape == expected.attentions[step][0].shape  # [1, heads, queries, its own keys]
        torch.testing.assert_close(weights, expected.attentions[step][0], atol=1e-5, rtol=1e-4)


def test_a_generation_takes_no_more_jobs_than_a_batch_may_hold(llama):
    ex = BatchExecutor(ModelSpec(name="tiny", source="x", limits=ModelLimits(max_batch=2)), llama._module, llama.tokenizer)
    running, _ = ex.prepare([("a", gen_job(llama, MIXED[1], 4)), ("b", gen_job(llama, MIXED[2], 4))])
    later, _ = ex.prepare([("c", gen_job(llama, MIXED[0], 2))])
    reached, go = threading.Event(), threading.Event()

    def pass_begins(module, args, kwargs):  # type: ignore[no-untyped-def]
        reached.set()
        assert go.wait(60)

    handle = llama._module.register_forward_pre_hook(pass_begins, with_kwargs=True)
    thread = threading.Thread(target=lambda: ex.run_decoded(running))
    try:
        thread.start()
        assert reached.wait(60)
        assert ex.join(later) == {}  # full: it waits for a turn of its own
    finally:
        go.set()
        handle.remove()
        thread.join(timeout=120)


def _source_job(ids: list[int]) -> bytes:
    """Reads inside a module's forward: the attention call's weights (`.source`), and an MLP op's
    output, edited at the job's last token."""
    g = Graph()
    g.invokes.append(Invoke(args=[ids]))
    call = "transformer.h.0.attn.source.attention_interface_0"
    g.saves.append(g.add(Node("getitem", [Ref(g.add(Node("output", [call, 0, 0])).id), 1])).id)
    act = g.add(Node("output", ["transformer.h.1.mlp.source.self_act_0", 0, 0]))
    g.add(Node("setitem", [Ref(act.id), (slice(None), -1), 0.0]))
    final = g.add(Node("output", ["", 0, 0]))
    g.saves.append(g.add(Node("getattr", [Ref(final.id), "logits"])).id)
    return pack_request(g, {})


def test_source_reads_and_edits_in_a_mixed_batch_see_the_jobs_own_tokens(gpt2):
    """`.source` values of jobs of different lengths sharing a pass: the attention weights are
    [heads, its tokens, its tokens] and an edit at -1 hits its own last token, as hand-written
    hooks on the plain model (eager attention, `output_attentions`) find alone."""
    model = gpt2._module
    ex = BatchExecutor(ModelSpec(name="tiny", source="x", limits=ModelLimits()), model, None)
    prompts = [_prompt(n, seed) for seed, n in enumerate(LENGTHS)]
    outcomes, sizes = _counted(model, lambda: ex.run([(str(i), _source_job(p)) for i, p in enumerate(prompts)]))
    assert sizes == [len(prompts)]
    current = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        for i, ids in enumerate(prompts):
            weights, logits = unpack_result(outcomes[str(i)].result).values()
            act = model.transformer.h[1].mlp.act
            handle = act.register_forward_hook(lambda m, a, o: o.index_fill(1, torch.tensor([o.shape[1] - 1]), 0.0))
            try:
                with torch.no_grad():
                    expected = model(torch.tensor([ids]), output_attentions=True)
            finally:
                handle.remove()
            assert weights.shape == (1, 4, len(ids), len(ids)) == expected.attentions[0].shape
            torch.testing.assert_close(weights, expected.attentions[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(logits, expected.logits, atol=1e-5, rtol=1e-4)
    finally:
        model.set_attn_implementation(current)


def test_a_joiner_whose_prefill_fails_fails_alone_and_leaves_the_model_clean(gpt2):
    """A joiner's prompt too long for the model (130 tokens, 128 positions): the running job
    goes on to its solo result, the joiner hears its own error, and no hook is left behind."""
    from tests.support.oracles import hooks_of

    model = gpt2._module
    ex = executor(gpt2)
    before = hooks_of(model)
    running, _ = ex.prepare([("long", gen_job(gpt2, MIXED[1], 12))])
    late, _ = ex.prepare([("bad", pack_request(_too_long(), {}))])
    finished: dict = {}
    reached, go = threading.Event(), threading.Event()
    passes = [0]

    def pass_begins(module, args, kwargs):  # type: ignore[no-untyped-def]
        passes[0] += 1
        if passes[0] == 3:
            reached.set()
            assert go.wait(60)

    handle = model.register_forward_pre_hook(pass_begins, with_kwargs=True)
    thread = threading.Thread(target=lambda: finished.update(ex.run_decoded(running)))
    try:
        thread.start()
        assert reached.wait(60)
        futures = ex.join(late)
        go.set()
        failed = futures["bad"].result(timeout=120)
        thread.join(timeout=120)
    finally:
        go.set()
        handle.remove()
    assert not failed.ok and "index out of range" in (failed.error or "")
    ids, _ = values(finished["long"])
    assert torch.equal(ids, hf_generate(gpt2, MIXED[1], 12))
    assert hooks_of(model) == before


def _too_long() -> Graph:
    g = Graph(kind="generate", options={"max_new_tokens": 2})
    g.invokes.append(Invoke(args=[[3] * 130]))
    g.saves.append(g.add(Node("model_output", [])).id)
    return g
