"""Generation batched across users, on the real executor: generate jobs with different decoding
settings (greedy, sampling with their own seeds, different max_new_tokens) and per-step edits
share one `generate`, and each job's tokens, saves and logits equal its solo run; the solo runs
equal Hugging Face's own `generate` with the same edit as a hand-written hook (the oracle)."""

from __future__ import annotations

import torch
from nnfabric.graph import Graph, Invoke, Node, Ref
from nnfabric.runtime.wire import pack_request, unpack_result

from services.common.catalog import ModelLimits, ModelSpec
from services.worker.executor import BatchExecutor

# The same number of tokens each (8): jobs share a pass only when their prompts have one width.
PROMPTS = ["The Eiffel Tower is in the city of", "The Colosseum is in the city of Rome", "Alice went to the shop"]
STEER = 3.0  # scales the residual stream (a constant shift would vanish in the next layer norm)


def executor(model):
    return BatchExecutor(ModelSpec(name="tiny", source="x", limits=ModelLimits()), model._module, model.tokenizer)


def layer0(model) -> str:
    return "transformer.h.0" if hasattr(model._module, "transformer") else "model.layers.0"


def gen_job(model, prompt, n, steer=None, bad_step=None, huge=False, fabric_model=None, **options):
    g = Graph(kind="generate", options={"max_new_tokens": n, **options})
    g.invokes.append(Invoke(args=[prompt]))
    for step in range(n):
        if steer is not None:
            h = g.add(Node("output", [layer0(model), step, 0]))
            moved = g.add(Node("binary", ["mul", Ref(h.id), steer]))
            g.add(Node("set_output", [layer0(model), step, 0, Ref(moved.id)]))
        if huge:
            h = g.add(Node("output", [layer0(model), step, 0]))
            g.add(Node("set_output", [layer0(model), step, 0, Ref(g.add(Node("binary", ["mul", Ref(h.id), 1e30])).id)]))
        if bad_step == step:
            h = g.add(Node("output", [layer0(model), step, 0]))
            g.add(Node("getitem", [Ref(h.id), 99]))
        if step == min(1, n - 1):
            logits = g.add(Node("output", ["lm_head", step, 0]))
    out = g.add(Node("model_output", []))
    g.saves.extend([out.id, logits.id])
    return pack_request(g, {}, extra={"model": fabric_model} if fabric_model else None)


def values(outcome):
    assert outcome.ok, outcome.error
    found = list(unpack_result(outcome.result).values())
    (ids,) = [v for v in found if not v.is_floating_point()]
    (logits,) = [v for v in found if v.is_floating_point()]
    return ids, logits


def hf_generate(model, prompt, n, steer=None, seed=None):
    """The oracle: the plain model's generate, the steering as a forward hook."""
    module = model._module.get_submodule(layer0(model))
    handle = module.register_forward_hook(lambda m, a, o: o * steer) if steer is not None else None
    ids = torch.tensor([model.tokenizer(prompt)["input_ids"]])
    try:
        if seed is not None:
            torch.manual_seed(seed)
        return model._module.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=seed is not None,
            pad_token_id=model.tokenizer.pad_token_id,
        )  # fmt: skip
    finally:
        if handle:
            handle.remove()


def count_steps(model, run):
    calls = []
    handle = model._module.lm_head.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        return run(), len(calls)
    finally:
        handle.remove()


def mixed_jobs(model):
    return {
        "greedy-steered": gen_job(model, PROMPTS[0], 6, steer=STEER),
        "sampled": gen_job(model, PROMPTS[1], 4, do_sample=True, seed=7),
        "short-greedy": gen_job(model, PROMPTS[2], 2),
        "sampled-other-seed": gen_job(model, PROMPTS[2], 5, steer=STEER, do_sample=True, seed=11),
    }


def check_mixed_batch(model):
    ex = executor(model)
    jobs = mixed_jobs(model)
    solo = {name: values(ex.run([(name, payload)])[name]) for name, payload in jobs.items()}
    merged, steps = count_steps(model, lambda: ex.run(list(jobs.items())))
    assert steps == 6  # one generate for all four jobs: as many steps as the longest
    for name in jobs:
        ids, logits = values(merged[name])
        assert torch.equal(ids, solo[name][0]), name
        assert torch.allclose(logits, solo[name][1], atol=1e-5), name
    # The solo runs are Hugging Face's own generate (greedy, or sampling from the job's seed).
    assert torch.equal(solo["greedy-steered"][0], hf_generate(model, PROMPTS[0], 6, steer=STEER))
    assert torch.equal(solo["short-greedy"][0], hf_generate(model, PROMPTS[2], 2))
    assert torch.equal(solo["sampled"][0], hf_generate(model, PROMPTS[1], 4, seed=7))
    assert torch.equal(solo["sampled-other-seed"][0], hf_generate(model, PROMPTS[2], 5, steer=STEER, seed=11))
    plain = values(ex.run([("plain", gen_job(model, PROMPTS[0], 6))])["plain"])
    assert not torch.allclose(solo["greedy-steered"][1], plain[1], atol=1e-3)  # the steering counts


def test_generate_jobs_with_different_settings_share_one_generate_and_equal_their_solo_runs_gpt2(gpt2):
    check_mixed_batch(gpt2)


def test_generate_jobs_with_different_settings_share_one_generate_and_equal_their_solo_runs_llama(llama):
    check_mixed_batch(llama)


def test_hostile_generate_jobs_leave_honest_batch_mates_tokens_as_alone(gpt2):
    ex = executor(gpt2)
    honest = {
        "a": gen_job(gpt2, PROMPTS[0], 4, steer=STEER),
        "b": gen_job(gpt2, PROMPTS[1], 3, do_sample=True, seed=3),
    }
    solo = {name: values(ex.run([(name, payload)])[name]) for name, payload in honest.items()}
    for hostile in (gen_job(gpt2, PROMPTS[2], 4, bad_step=2), gen_job(gpt2, PROMPTS[2], 4, huge=True)):
        outcomes = ex.run([*honest.items(), ("hostile", hostile)])
        for name in honest:
            ids, logits = values(outcomes[name])
            assert torch.equal(ids, solo[name][0])
            assert torch.allclose(logits, solo[name][1], atol=1e-5)
    assert not ex.run([("bad", gen_job(gpt2, PROMPTS[2], 4, bad_step=2))])["bad"].ok


def test_a_seeded_job_samples_the_same_tokens_whoever_shares_its_generate(gpt2):
    ex = executor(gpt2)
    mine = gen_job(gpt2, PROMPTS[0], 5, do_sample=True, seed=5)
    alone = values(ex.run([("mine", mine)])["mine"])[0]
    for seed in (1, 2):  # strangers sampling with seeds of their own
        stranger = gen_job(gpt2, PROMPTS[1], 5, do_sample=True, seed=seed)
        assert torch.equal(values(ex.run([("s", stranger), ("mine", mine)])["mine"])[0], alone)




def per_step_logits_job(prompt, n, **options):
    """Every step's logits into a list (`tracer.list()` + `.append` under `tracer.all()`)."""
    g = Graph(kind="generate", options={"max_new_tokens": n, **options})
    g.invokes.append(Invoke(args=[prompt]))
    steps = g.add(Node("list", []))
    for step in range(n):
        logits = g.add(Node("output", ["lm_head", step, 0], optional=True))
        g.add(Node("append", [Ref(steps.id), Ref(logits.id)], optional=True))
    out = g.add(Node("model_output", []))
    g.saves.extend([steps.id, out.id])
    return pack_request(g, {})


def test_a_job_that_ends_early_sees_only_its_own_steps_among_longer_jobs(gpt2):
    ex = executor(gpt2)
    config = gpt2._module.generation_config
    plain = values(ex.run([("p", gen_job(gpt2, PROMPTS[2], 6, do_sample=True, seed=7))])["p"])[0]
    width = len(gpt2.tokenizer(PROMPTS[2])["input_ids"])
    saved_eos = config.eos_token_id
    new = plain[0, width:].tolist()
    stop = next(k for k in range(1, len(new)) if new[k] not in new[:k])
    config.eos_token_id = new[stop]  # a token it first makes at step `stop`: alone, it ends there
    try:
        mine = per_step_logits_job(PROMPTS[2], 6, do_sample=True, seed=7)
        alone = list(unpack_result(ex.run([("mine", mine)])["mine"].result).values())
        merged = ex.run([("mine", mine), ("long", gen_job(gpt2, PROMPTS[0], 6))])
        together = list(unpack_result(merged["mine"].result).values())
    finally:
        config.eos_token_id = saved_eos
    steps_alone, ids_alone = alone
    steps_together, ids_together = together
    assert ids_alone.shape[1] == width + stop + 1  # it did end early alone
    assert torch.equal(ids_together, ids_alone)
    assert len(steps_together) == len(steps_alone) == stop + 1
    for a, b in zip(steps_together, steps_alone, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_hostile_decoding_settings_fail_their_own_job_only(gpt2):
    ex = executor(gpt2)
    honest = gen_job(gpt2, PROMPTS[0], 4, do_sample=True, seed=3)
    alone = values(ex.run([("honest", honest)])["honest"])[0]
    for hostile in ({"temperature": -1.0}, {"top_p": -0.5}, {"seed": 10**19 * 5}, {"top_k": -7}):
        outcomes = ex.run([("honest", honest), ("hostile", gen_job(gpt2, PROMPTS[1], 4, do_sample=True, **hostile))])
        assert torch.equal(values(outcomes["honest"])[0], alone), hostile
        assert not outcomes["hostile"].ok and outcomes["hostile"].error, hostile
