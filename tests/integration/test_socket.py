"""/v1/socket: jobs submitted and answered on one websocket (one round trip per job), checked
against local runs; rejections, cancellation and large results on the same socket."""

from __future__ import annotations

import pytest
import torch
from nnfabric.errors import RemoteError
from nnfabric.graph import Graph, Invoke, Node
from nnfabric.runtime.wire import pack_request, unpack_result

from tests.integration.test_result_store import big_job
from tests.support.job_socket import JobSocket
from tests.support.jobs import slow_job

PROMPTS = ["The Eiffel Tower is in the city of", "Alice went to the market", "One two three"]


def hidden_job(prompt: str, model: str = "tiny-gpt2") -> bytes:
    g = Graph()
    g.invokes.append(Invoke(args=[prompt]))
    h = g.add(Node("output", ["transformer.h.1", 0, 0]))
    g.saves.append(h.id)
    return pack_request(g, {}, extra={"model": model})


def local_hidden(gpt2, prompt: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    seen = {}
    handle = gpt2._module.transformer.h[1].register_forward_hook(lambda m, a, o: seen.setdefault("h", o))
    with torch.no_grad():
        gpt2._module(torch.tensor([gpt2.tokenizer(prompt)["input_ids"]]))
    handle.remove()
    return seen["h"]


def test_jobs_submitted_back_to_back_on_one_socket_return_the_local_values(fabric, gpt2):
    with JobSocket(fabric.url, fabric.keys["alice"]) as jobs:
        ids = [jobs.submit(hidden_job(prompt)) for prompt in PROMPTS * 2]
        results = [jobs.result(job_id) for job_id in reversed(ids)][::-1]  # read in any order
        assert len(set(ids)) == len(ids)
        for prompt, data in zip(PROMPTS * 2, results, strict=True):
            (value,) = unpack_result(data).values()
            expected = local_hidden(gpt2, prompt)
            # Jobs that shared a forward pass (left padded) agree to float tolerance (README).
            assert torch.allclose(value[:, -expected.shape[1] :], expected, atol=1e-5)
        assert [e["type"] for e in jobs.events(ids[0])][-1] == "completed"
        assert any(e.get("inline") for e in jobs.events(ids[0]))  # small results ride the socket


def test_a_rejected_job_says_why_and_the_socket_goes_on(fabric):
    with JobSocket(fabric.url, fabric.keys["bob"]) as jobs:
        with pytest.raises(RemoteError, match="may not use model"):
            jobs.submit(hidden_job(PROMPTS[0], model="tiny-strict"))  # bob's key covers tiny-gpt2 only
        with pytest.raises(RemoteError, match="not an nnfabric envelope"):
            jobs.submit(b"garbage")
        assert unpack_result(jobs.result(jobs.submit(hidden_job(PROMPTS[1]))))


def test_a_job_waiting_behind_another_can_be_cancelled_on_the_socket(fabric):
    with JobSocket(fabric.url, fabric.keys["alice"]) as jobs:
        busy = [jobs.submit(slow_job(steps=30))]  # keeps the replica busy for a few seconds
        waiting = jobs.submit(slow_job(steps=30))
        jobs.cancel(waiting)
        with pytest.raises(RemoteError, match="cancelled"):
            jobs.result(waiting)
        assert all(unpack_result(jobs.result(job_id)) for job_id in busy)


def test_a_large_result_is_fetched_from_the_result_store(fabric):
    with JobSocket(fabric.url, fabric.keys["alice"]) as jobs:
        (value,) = unpack_result(jobs.result(jobs.submit(big_job()))).values()
    assert torch.equal(value, torch.ones(700, 700))


def test_a_socket_without_a_key_is_refused(fabric):
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    with pytest.raises((InvalidStatus, ConnectionClosed)):  # refused before any job is taken
        with JobSocket(fabric.url, "nnf_not-a-key") as jobs:
            jobs.submit(hidden_job(PROMPTS[0]))


def test_a_job_whose_end_the_socket_never_heard_is_answered_from_its_record(fabric, gpt2):
    # Submitted over plain HTTP, so no follower on this socket ever sends its events: after a
    # quiet spell the socket client reads the job's record and fetches the result.
    from tests.support.jobs import submit

    job_id = submit(fabric, hidden_job(PROMPTS[0]))
    with JobSocket(fabric.url, fabric.keys["alice"], quiet_s=0.5) as jobs:
        (value,) = unpack_result(jobs.result(job_id, timeout=60)).values()
    expected = local_hidden(gpt2, PROMPTS[0])
    assert torch.allclose(value, expected, atol=1e-5)
