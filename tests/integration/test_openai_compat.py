"""The high-level routes from any client: the official `openai` package pointed at the fabric,
and the activations route. The oracle is the same work written as a local trace."""

from __future__ import annotations

import httpx
import pytest
import torch
from openai import OpenAI

CLEAN = "The Eiffel Tower is in the city of"


@pytest.fixture
def client(fabric):
    return OpenAI(base_url=f"{fabric.url}/v1", api_key=fabric.keys["alice"], max_retries=0, timeout=120)


def local_continuation(model, prompt, tokens, vector=None):
    with model.generate(prompt, max_new_tokens=tokens) as tracer:
        if vector is not None:
            with tracer.all():
                model.transformer.h[0].output[:, -1] += vector
        out = tracer.output.save()
    start = len(model.tokenizer(prompt)["input_ids"])
    return model.tokenizer.decode(out.value[0, start:], skip_special_tokens=True)


def test_a_plain_completion_equals_local_generation(client, alice):
    reply = client.completions.create(model="tiny-gpt2", prompt=CLEAN, max_tokens=6, temperature=0)
    assert reply.choices[0].text == local_continuation(alice, CLEAN, 6)
    assert reply.usage.prompt_tokens == len(alice.tokenizer(CLEAN)["input_ids"])
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_a_steered_completion_equals_the_same_steering_as_a_trace(client, alice):
    vector = torch.linspace(-4, 4, 64)
    steering = {"interventions": [{"module": "transformer.h.0", "add": vector.tolist(), "steps": "all"}]}
    steered = client.completions.create(
        model="tiny-gpt2", prompt=CLEAN, max_tokens=6, temperature=0, extra_body={"nnfabric": steering}
    )
    expected = local_continuation(alice, CLEAN, 6, vector)
    assert steered.choices[0].text == expected
    assert expected != local_continuation(alice, CLEAN, 6)  # the steering changed something


def test_an_exact_completion_runs_alone_and_equals_local_generation(client, alice, fabric):
    reply = client.completions.create(model="tiny-gpt2", prompt=CLEAN, max_tokens=6, temperature=0,
                                      extra_body={"nnfabric": {"exact": True}})  # fmt: skip
    assert reply.choices[0].text == local_continuation(alice, CLEAN, 6)
    job_id = reply.id.removeprefix("cmpl-")
    events = httpx.get(f"{fabric.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {fabric.keys['alice']}"})
    assert events.json()["state"] == "completed"


def test_streaming_gives_the_same_text(client):
    whole = client.completions.create(model="tiny-gpt2", prompt=CLEAN, max_tokens=6, temperature=0)
    pieces = client.completions.create(model="tiny-gpt2", prompt=CLEAN, max_tokens=6, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in pieces) == whole.choices[0].text


def test_chat_completion_uses_the_models_conversation_format(client, alice):
    messages = [{"role": "user", "content": "Where is the Eiffel Tower?"}]
    reply = client.chat.completions.create(model="tiny-gpt2", messages=messages, max_tokens=5, temperature=0)
    # The tiny model has no chat template: the fabric writes the plain transcript.
    prompt = "user: Where is the Eiffel Tower?\nassistant:"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == local_continuation(alice, prompt, 5)
    streamed = client.chat.completions.create(
        model="tiny-gpt2", messages=messages, max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == reply.choices[0].message.content


def test_seeded_sampling_is_reproducible(client):
    runs = [client.completions.create(model="tiny-gpt2", prompt=CLEAN, max_tokens=8, temperature=1.0, seed=7)
            for _ in range(2)]  # fmt: skip
    assert runs[0].choices[0].text == runs[1].choices[0].text


def test_bad_requests_are_4xx(client, fabric):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt=CLEAN, max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="tiny-gpt2", prompt=CLEAN, max_tokens=10_000)
    with pytest.raises(openai.UnprocessableEntityError):
        steering = {"interventions": [{"module": "transformer.nope", "add": [1.0] * 64}]}
        client.completions.create(model="tiny-gpt2", prompt=CLEAN, max_tokens=2, extra_body={"nnfabric": steering})
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{fabric.url}/v1", api_key="nnf_wrong", max_retries=0).completions.create(
            model="tiny-gpt2", prompt=CLEAN, max_tokens=2
        )


def test_activations_route_equals_a_local_trace(fabric, alice):
    body = {"prompts": [CLEAN, "The Colosseum is in"], "modules": ["transformer.h.0", "transformer.h.1"],
            "positions": [-1]}  # fmt: skip
    reply = httpx.post(f"{fabric.url}/v1/models/tiny-gpt2/activations", json=body,
                       headers={"Authorization": f"Bearer {fabric.keys['alice']}"}, timeout=120)  # fmt: skip
    assert reply.status_code == 200, reply.text
    found = reply.json()["activations"]
    import base64

    import numpy as np

    for index, prompt in enumerate(body["prompts"]):
        with alice.trace(prompt):
            expected = [alice.transformer.h[i].output[:, [-1]].save() for i in range(2)]
        for layer, value in zip(body["modules"], expected, strict=True):
            got = found[str(index)][layer]
            array = np.frombuffer(base64.b64decode(got["data"]), dtype=np.float32).reshape(got["shape"])
            assert torch.allclose(torch.from_numpy(array.copy()), value.value, atol=1e-5)


def test_steering_with_a_vector_an_earlier_job_saved(client, alice):
    with alice.trace("Paris is the capital of France", remote=True) as tracer:
        direction = alice.transformer.h[1].output[0, -1].save()
    steering = {"interventions": [{"module": "transformer.h.0", "scale": 3.0,
                                   "saved": {"job": tracer.job.id, "value": "direction"}}]}  # fmt: skip
    steered = client.completions.create(
        model="tiny-gpt2", prompt=CLEAN, max_tokens=6, temperature=0, extra_body={"nnfabric": steering}
    )
    assert steered.choices[0].text == local_continuation(alice, CLEAN, 6, 3.0 * direction.value)
    import openai

    with pytest.raises(openai.UnprocessableEntityError):  # not a name that job saved
        missing = {"interventions": [{"module": "transformer.h.0", "saved": {"job": tracer.job.id, "value": "x"}}]}
        client.completions.create(model="tiny-gpt2", prompt=CLEAN, max_tokens=2, extra_body={"nnfabric": missing})


def test_streamed_tokens_are_events_of_the_job_as_each_step_makes_them(client, fabric, alice):
    """`stream: true` sends each step's token as a `tokens` event of the job (what an HTTP caller
    following the job sees) before its result, and the chunks are made from them."""
    import asyncio

    from services.common.store import Store

    chunks = list(client.completions.create(model="tiny-gpt2", prompt=CLEAN, max_tokens=8, temperature=0, stream=True))
    job_id = chunks[0].id.removeprefix("cmpl-")

    async def events() -> list:
        store = Store.from_url(fabric.settings.redis_url, 60)
        try:
            return await store.events(job_id)
        finally:
            await store.close()

    found = asyncio.run(events())
    kinds = [event["type"] for event in found]
    steps = [event for event in found if event["type"] == "tokens"]
    assert [event["step"] for event in steps] == list(range(8))
    assert kinds.index("completed") > kinds.index("tokens")  # every token before the result
    with alice.generate(CLEAN, max_new_tokens=8) as tracer:
        out = tracer.output.save()
    start = len(alice.tokenizer(CLEAN)["input_ids"])
    assert [event["tokens"][0] for event in steps] == out.value[0, start:].tolist()
    pieces = [chunk.choices[0].text for chunk in chunks if chunk.choices[0].text]
    assert len(pieces) > 1 and "".join(pieces) == local_continuation(alice, CLEAN, 8)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
