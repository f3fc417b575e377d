"""Generate jobs sent together to the fabric equal Hugging Face's own `generate` with the same
edit as a hand-written hook."""

from __future__ import annotations

import torch
from nnfabric.runtime.wire import unpack_result

from tests.unit.test_batched_generate import gen_job, hf_generate

# The same number of tokens each (8): jobs share a pass only when their prompts have one width.
PROMPTS = ["The Eiffel Tower is in the city of", "The Colosseum is in the city of Rome", "Alice went to the shop"]
STEER = 3.0  # scales the residual stream (a constant shift would vanish in the next layer norm)


def test_generate_jobs_sent_together_to_the_fabric_equal_hugging_faces_generate(fabric, gpt2):
    import httpx

    from tests.support.jobs import headers, job, submit, wait_for

    jobs = {
        "steered": (gen_job(gpt2, PROMPTS[0], 6, steer=STEER, fabric_model="tiny-gpt2"), hf_generate(gpt2, PROMPTS[0], 6, steer=STEER)),
        "sampled": (gen_job(gpt2, PROMPTS[1], 4, do_sample=True, seed=7, fabric_model="tiny-gpt2"), hf_generate(gpt2, PROMPTS[1], 4, seed=7)),
        "short": (gen_job(gpt2, PROMPTS[2], 2, fabric_model="tiny-gpt2"), hf_generate(gpt2, PROMPTS[2], 2)),
    }  # fmt: skip
    ids = {name: submit(fabric, payload) for name, (payload, _) in jobs.items()}
    for name, job_id in ids.items():
        wait_for(lambda j=job_id: job(fabric, j)["state"] in ("completed", "failed"), what=f"job {name}")
        response = httpx.get(f"{fabric.url}/v1/jobs/{job_id}/result", headers=headers(fabric), timeout=30)
        assert response.status_code == 200, response.text
        found = [v for v in unpack_result(response.content).values() if not v.is_floating_point()]
        assert torch.equal(found[0], jobs[name][1]), name


def test_streamed_generations_yield_each_jobs_own_tokens_as_they_are_made(alice):
    """Two generations with prompts of different lengths, sent together with stream=True: each
    job's `tokens()` yields its own tokens step by step (never its batch-mate's), equal to a
    local generation, and then its saved output is there as with `wait()`."""
    prompts, news = ["Hi there", "The Eiffel Tower is in the city of"], [5, 7]
    tracers = []
    for prompt, new in zip(prompts, news, strict=True):
        with alice.generate(prompt, max_new_tokens=new, remote=True, blocking=False, stream=True) as tracer:
            out = tracer.output.save()
        tracers.append((tracer, out))
    for (tracer, out), prompt, new in zip(tracers, prompts, news, strict=True):
        steps = list(tracer.job.tokens(timeout=120))
        with alice.generate(prompt, max_new_tokens=new) as local:
            expected = local.output.save()
        start = len(alice.tokenizer(prompt)["input_ids"])
        assert steps == [[token] for token in expected.value[0, start:].tolist()]
        assert torch.equal(out.value, expected.value)
