"""Models split into pipeline stages on a two-node Ray cluster on one machine (two `ray start`
nodes, one CPU each): each replica reserves a placement group with one bundle per stage, spread
strictly over both nodes, and starts a stage actor per bundle. The fabric around it is the one
`nnfabric-server serve` runs, attached to that cluster.

Its own pytest run beside the topology test (`make test` runs it after the main suite), one
cluster at a time; every Ray process is stopped by its process group id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nnfabric
import pytest
import torch
import yaml

from services.common.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The Eiffel Tower is in the city of"
PROMPTS = ["The Eiffel Tower is in", "Bob said that"]


def _start(folder: Path, name: str, command: list[str]) -> subprocess.Popen[bytes]:
    log = (folder / f"{name}.log").open("wb")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def _stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, OSError, KeyError, ValueError):
            found = predicate()
            if found:
                return found
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def staged(gpt2_4_dir: Path, llama_4_dir: Path) -> Iterator[Any]:
    folder = Path(tempfile.mkdtemp(prefix="nnf-stg-", dir="/tmp"))  # short: Ray's socket paths have a limit
    # Ray's token authentication, as the chart runs it; this process (the launcher's driver) and
    # the scheduler it starts share the token (set before Ray is imported: it reads them then).
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(24)})
    import ray

    from services.launcher import EmbeddedFabric
    gcs = free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = [ray_bin, "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
            "--include-dashboard=false", f"--temp-dir={folder}/ray", "--block"]  # fmt: skip
    processes = [_start(folder, "ray-head", head)]
    fabric = None
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", gcs), timeout=1).close() is None, 120, "the head's GCS")
        processes.append(_start(folder, "ray-worker", [ray_bin, "start", f"--address=127.0.0.1:{gcs}",
                                                       "--node-ip-address=127.0.0.1", "--num-cpus=1", "--block"]))  # fmt: skip
        ray.init(address=f"127.0.0.1:{gcs}", namespace="nnfabric", log_to_driver=False, _node_ip_address="127.0.0.1")
        wait_for(lambda: sum(1 for n in ray.nodes() if n["Alive"]) == 2, 90, "two Ray nodes")
        catalog = {"models": [
            {"name": "staged-gpt2", "source": str(gpt2_4_dir), "stages": 2, "cpus": 0.4,
             "placement_strategy": "STRICT_SPREAD",
             "limits": {"max_batch": 4, "timeout_s": 60, "max_new_tokens": 16}},
            {"name": "staged-llama", "source": str(llama_4_dir), "stages": 2, "stage_layers": [[0, 1], [1, 4]],
             "cpus": 0.4, "placement_strategy": "STRICT_SPREAD",
             "limits": {"max_batch": 4, "timeout_s": 60, "max_new_tokens": 16}},
        ]}  # fmt: skip
        (folder / "catalog.yaml").write_text(yaml.safe_dump(catalog))
        started = time.monotonic()
        fabric = EmbeddedFabric.start(
            folder / "catalog.yaml",
            reclaim_idle_ms=1500,
            watchdog_margin_s=1.0,
            redis_data_dir=str(folder / "redis"),
            result_store_dir=str(folder / "results"),
        )
        from tests.support.fabric import _make_keys

        fabric.keys = asyncio.run(_make_keys(fabric.settings.redis_url))  # type: ignore[attr-defined]
        fabric.wait_ready()
        print(f"two staged models ready in {time.monotonic() - started:.1f} s")
        # Ray gives each stage actor (under one CPU) one thread: local runs here use one thread
        # too, so that the arithmetic (the order of each sum) is the same and results are equal to the bit.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield fabric
        finally:
            torch.set_num_threads(threads)
    except BaseException:
        for log in sorted(folder.glob("*.log")):
            print(f"--- {log.name} ---\n{log.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        if fabric is not None:
            fabric.stop()
        else:
            ray.shutdown()
        for process in reversed(processes):
            _stop(process)


def stage_places(fabric: Any, model: str) -> list[dict[str, Any]]:
    from services.common.store import Store

    async def read() -> list[dict[str, Any]]:
        store = Store.from_url(fabric.settings.redis_url)
        try:
            return list(json.loads((await store.model(model, "stages")).get("stages") or "[]"))
        finally:
            await store.close()

    return asyncio.run(read())


def thin(fabric: Any, name: str) -> Any:
    return nnfabric.connect(fabric.url, fabric.keys["alice"], progress=False).model(name)


def lens_and_patch(model: Any, layers: str, norm: str, remote: bool) -> list[torch.Tensor]:
    """Logit lens over every layer, with a stage-0 layer's activation patched into a stage-1 layer."""
    with model.trace(PROMPT, remote=remote):
        blocks = _at(model, layers)
        final_norm = _at(model, norm)
        early = blocks[0].output[:, 2]
        lens = [model.lm_head(final_norm(blocks[i].output)).save() for i in range(3)]
        blocks[3].output[:, 1] = early
        lens.append(model.lm_head(final_norm(blocks[3].output)).save())
        logits = model.lm_head.output.save()
    return [t.value for t in lens] + [logits.value]


def _at(model: Any, path: str) -> Any:
    found = model
    for part in path.split("."):
        found = getattr(found, part)
    return found


def gradients(model: Any, layers: str, remote: bool) -> list[torch.Tensor]:
    with model.trace(PROMPT, remote=remote):
        blocks = _at(model, layers)
        first, last = blocks[0].output, blocks[3].output
        g_first, g_last = first.grad.save(), last.grad.save()
        model.lm_head.output[:, -1, 5].sum().backward()
    return [g_first.value, g_last.value]


def steered(model: Any, layers: str, remote: bool) -> list[torch.Tensor]:
    with model.generate(PROMPTS, max_new_tokens=6, remote=remote) as tracer:
        blocks = _at(model, layers)
        logits = tracer.list().save()
        with tracer.all():
            blocks[1].output[:, -1] = blocks[1].output[:, -1] + 0.5
            blocks[2].output[:] = blocks[2].output * 1.25
            logits.append(model.lm_head.output[:, -1])
        out = tracer.output.save()
    return [out.value, *logits.value]


MODELS = [("staged-gpt2", "gpt2_4_dir", "transformer.h", "transformer.ln_f"),
          ("staged-llama", "llama_4_dir", "model.layers", "model.norm")]  # fmt: skip


@pytest.mark.parametrize(("name", "directory", "layers", "norm"), MODELS)
def test_a_staged_model_runs_the_seed_scenarios_equal_to_one_device(
    staged: Any, request: pytest.FixtureRequest, name: str, directory: str, layers: str, norm: str
) -> None:
    places = stage_places(staged, name)
    assert len(places) == 2 and places[0]["node"] != places[1]["node"], places  # one stage per node
    local = nnfabric.LanguageModel(str(request.getfixturevalue(directory)))
    remote = thin(staged, name)
    for scenario in (
        lambda m, r: lens_and_patch(m, layers, norm, r),
        lambda m, r: gradients(m, layers, r),
        lambda m, r: steered(m, layers, r),
    ):
        expected = scenario(local, False)
        found = scenario(remote, True)
        assert len(found) == len(expected)
        for a, b in zip(found, expected, strict=True):
            assert torch.equal(a, b)
    # The thin client sees the whole model's modules, never the stages.
    assert sorted(remote.tree.paths()) == sorted(local.tree.paths())


def test_jobs_sent_together_share_a_staged_pass_and_keep_their_own_rows(
    staged: Any, gpt2_4_dir: Path
) -> None:
    local = nnfabric.LanguageModel(str(gpt2_4_dir))
    remote = thin(staged, "staged-gpt2")
    prompts = ["The Eiffel Tower is in the city of", "Bob said that the weather", "One two three four five six",
               "The Colosseum is in the city of"]  # fmt: skip

    def job(model: Any, prompt: str, scale: float, remote_run: bool) -> torch.Tensor:
        with model.trace(prompt, remote=remote_run):
            model.transformer.h[2].output[:] = model.transformer.h[2].output * scale
            out = model.lm_head.output.save()
        return out.value

    results: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, job(remote, prompts[i], 1 + i, True)))
               for i in range(4)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for i, prompt in enumerate(prompts):
        assert torch.equal(results[i], job(local, prompt, 1 + i, False))


def test_a_stage_killed_mid_job_fails_over_and_later_jobs_succeed(staged: Any, gpt2_4_dir: Path) -> None:
    key = staged.keys["alice"]
    headers = {"Authorization": f"Bearer {key}"}
    local = nnfabric.LanguageModel(str(gpt2_4_dir))
    remote = thin(staged, "staged-gpt2")
    before = stage_places(staged, "staged-gpt2")
    slow = nnfabric.connect(staged.url, key, progress=False).model("staged-gpt2")
    # A long job: every generation step does real work on stage 1.
    with slow.generate(PROMPT, max_new_tokens=16, remote=True, blocking=False) as tracer:
        with tracer.all():
            hidden = slow.transformer.h[3].output
            heavy = (torch.ones(1500, 1500) * hidden[0, 0, 0]) @ torch.ones(1500, 1500) @ torch.ones(1500, 1500)
            slow.transformer.h[3].output[:] = hidden + heavy.sum() * 0
        out = tracer.output.save()
    job = tracer.job
    wait_for(lambda: job.status()["state"] != "queued", 60, "the long job to start")
    assert job.status()["state"] == "running", job.status()
    os.kill(before[1]["pid"], signal.SIGKILL)
    lost_at = time.monotonic()
    # Health says so while the replica (every stage with it) is replaced.
    info = wait_for(
        lambda: next((m for m in httpx.get(f"{staged.url}/v1/models", headers=headers).json()
                      if m["name"] == "staged-gpt2" and m["state"] == "unavailable" and "stage 1" in m["error"]),
                     None),
        30, "the model to be reported unavailable",
    )  # fmt: skip
    print(f"unavailable after {time.monotonic() - lost_at:.1f} s: {info['error']}")
    job.wait(timeout=180)
    ended = job.status()
    print(f"the long job ended {time.monotonic() - lost_at:.1f} s after the stage was lost: {ended['state']}")
    assert ended["state"] == "completed" and ended.get("attempts") == 2, json.dumps(ended)  # once more, on a whole replica
    after = stage_places(staged, "staged-gpt2")
    assert {p["pid"] for p in after}.isdisjoint({p["pid"] for p in before})  # a whole new replica
    with local.generate(PROMPT, max_new_tokens=16) as tracer:
        expected = tracer.output.save()
    assert torch.equal(out.value, expected.value)
    for scenario in (lambda m, r: lens_and_patch(m, "transformer.h", "transformer.ln_f", r),
                     lambda m, r: gradients(m, "transformer.h", r)):  # fmt: skip
        for a, b in zip(scenario(remote, True), scenario(local, False), strict=True):
            assert torch.equal(a, b)
