"""The notebooks of examples/notebooks, each executed in a real Jupyter kernel against the live
fabric (the tiny GPT-2 as `tiny-gpt2`): each draws its figure, and its numbers equal the plain
model's, computed here by hand-written hooks. Interrupting a cell cancels its remote job."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import httpx
import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient
from PIL import Image

from tests.support.jobs import wait_for
from tests.support.keys import new_key
from tests.support.oracles import Hook, ids

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "examples" / "notebooks"
CLEAN = "The Eiffel Tower is in the city of"
CORRUPT = "The Colosseum is in the city of"

# Appended to each notebook: what it computed and what its figure shows, for the checks below.
DUMP = """
import numpy as _np, torch as _torch
_torch.save({{"result": result,
             "images": [_np.asarray(im.get_array()) for ax in fig.axes for im in ax.images],
             "bars": [[p.get_height() for p in ax.patches] for ax in fig.axes if ax.patches]}}, {path!r})
"""


def kernel_env(fabric, key: str, gpt2_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kernel's inline (Agg) backend
    env.update(
        NNFABRIC_URL=fabric.url,
        NNFABRIC_API_KEY=key,
        NNFABRIC_MODEL="tiny-gpt2",
        NNFABRIC_LOCAL_MODEL=str(gpt2_dir),
        # this checkout's nnfabric, whatever the venv has installed
        PYTHONPATH=os.pathsep.join([str(ROOT / "client"), str(ROOT), env.get("PYTHONPATH", "")]),
    )
    return env


def execute(name: str, env: dict[str, str], dump: Path) -> tuple[nbformat.NotebookNode, dict]:
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(DUMP.format(path=str(dump))))
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute(env=env)  # raises on the first cell that fails
    return notebook, torch.load(dump, weights_only=False)


def outputs(notebook: nbformat.NotebookNode, mime: str) -> list[str]:
    return [o["data"][mime] for c in notebook.cells if c.cell_type == "code" for o in c.outputs
            if mime in o.get("data", {})]  # fmt: skip


def assert_drew_a_figure(notebook: nbformat.NotebookNode) -> None:
    """The notebook's own last cell shows a PNG that is not one flat color."""
    last = notebook.cells[-2]  # [-1] is the dump appended above
    (png,) = [o["data"]["image/png"] for o in last.outputs if "image/png" in o.get("data", {})]
    image = Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB")
    assert image.width > 200 and image.height > 150
    low, high = zip(*image.getextrema(), strict=True)
    assert max(high) - min(low) > 100 and len(image.getcolors(1 << 20) or []) > 20


def block_outputs(module: torch.nn.Module, text: str, tokenizer) -> list[torch.Tensor]:
    hooks = [Hook(block) for block in module.transformer.h]
    try:
        with torch.no_grad():
            module(torch.tensor([tokenizer(text)["input_ids"]]))
    finally:
        for hook in hooks:
            hook.handle.remove()
    return [hook.seen[0] for hook in hooks]


# -- the oracles: the plain model and hand-written hooks -------------------------------------------
def oracle_logit_lens(gpt2):
    module = gpt2._module
    with torch.no_grad():
        probs = torch.stack([module.lm_head(module.transformer.ln_f(h[0])) for h in
                             block_outputs(module, CLEAN, gpt2.tokenizer)]).softmax(-1)  # fmt: skip
    return probs.max(-1)


def oracle_patching(gpt2):
    module, paris = gpt2._module, gpt2.tokenizer(" Paris")["input_ids"][0]
    clean = block_outputs(module, CLEAN, gpt2.tokenizer)
    n = min(len(gpt2.tokenizer(CLEAN)["input_ids"]), len(gpt2.tokenizer(CORRUPT)["input_ids"]))
    effect = torch.zeros(len(clean), n)
    for i, block in enumerate(module.transformer.h):
        for p in range(n):

            def patch(out, i=i, p=p):
                out = out.clone()
                out[:, p - n] = clean[i][:, p - n]
                return out

            with Hook(block, patch), torch.no_grad():
                effect[i, p] = module(ids(gpt2, CORRUPT)).logits[0, -1].softmax(-1)[paris]
    return effect


def oracle_attribution(gpt2):
    module, paris = gpt2._module, gpt2.tokenizer(" Paris")["input_ids"][0]
    seen = []

    def keep(mod, args):
        args[0].retain_grad()
        seen.append(args[0])

    handle = module.transformer.h[0].register_forward_pre_hook(keep)
    try:
        module(ids(gpt2, CLEAN)).logits[0, -1, paris].backward()
    finally:
        handle.remove()
        module.zero_grad(set_to_none=True)
    return (seen[0].grad * seen[0]).sum(-1)[0].detach()


def oracle_attention(gpt2, layer: int):
    """Attention weights by hand from the layer's query and key projections (causal softmax)."""
    module = gpt2._module
    heads = module.config.n_head
    with Hook(module.transformer.h[layer].attn.c_attn) as qkv, torch.no_grad():
        module(ids(gpt2, CLEAN))
    q, k, _ = qkv.seen[0][0].split(module.config.n_embd, dim=-1)
    q, k = (t.reshape(t.shape[0], heads, -1).transpose(0, 1) for t in (q, k))
    scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
    causal = torch.ones(scores.shape[-1], scores.shape[-1], dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def oracle_steering(gpt2, layer: int, steps: int):
    module, tokenizer = gpt2._module, gpt2.tokenizer
    state = block_outputs(module, CLEAN, tokenizer)[layer][0, -1]
    runs = []
    for steer in (False, True):
        calls = []

        def edit(out, calls=calls, steer=steer):
            calls.append(1)
            if not steer or len(calls) > 1:  # the first step only
                return None
            out = out.clone()
            out[:, -1] = state
            return out

        prompt = ids(gpt2, CORRUPT)
        with Hook(module.transformer.h[layer], edit), torch.no_grad():
            made = module.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                                   do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                   output_scores=True, return_dict_in_generate=True)  # fmt: skip
        sure = torch.stack([s[0].softmax(-1).max() for s in made.scores])
        runs.append((made.sequences[0, -steps:], sure))
    return runs


# -- the notebooks ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(fabric, gpt2_dir):
    return kernel_env(fabric, new_key(fabric.settings.redis_url, "nora"), gpt2_dir)


def assert_shows_the_fabric_and_the_model(notebook):
    html = "\n".join(outputs(notebook, "text/html"))
    assert "tiny-gpt2" in html and "nnfabric fabric" in html  # connect()'s rich display
    assert "GPT2LMHeadModel" in html and "here (cpu, float32)" in html  # the model's


def test_logit_lens(env, gpt2, tmp_path):
    notebook, dumped = execute("logit_lens", env, tmp_path / "dump.pt")
    assert_drew_a_figure(notebook)
    assert_shows_the_fabric_and_the_model(notebook)
    top_prob, top_id = dumped["result"]
    expected = oracle_logit_lens(gpt2)
    assert torch.allclose(top_prob, expected.values, atol=1e-5) and torch.equal(top_id, expected.indices)
    assert np.allclose(dumped["images"][0], top_prob.numpy())  # the heatmap is these numbers
    # the remote job's state was one line, updated in place until done
    assert any(line.startswith("job ") and ": done" in line for line in outputs(notebook, "text/plain"))


def test_patching(env, gpt2, tmp_path):
    notebook, dumped = execute("patching", env, tmp_path / "dump.pt")
    assert_drew_a_figure(notebook)
    expected = oracle_patching(gpt2)
    assert torch.allclose(dumped["result"], expected, atol=1e-6)
    assert np.allclose(dumped["images"][0], expected.numpy(), atol=1e-6)
    layers = len(gpt2.transformer.h)
    bars = [line for line in outputs(notebook, "text/plain") if line.startswith("sweep:")]
    # one bar per sweep (the local sweep and the remote one), each ending with all of its jobs done
    assert len(bars) == 2 and all(bar.startswith(f"sweep: {layers}/{layers} jobs") for bar in bars)


def test_attribution(env, gpt2, tmp_path):
    notebook, dumped = execute("attribution", env, tmp_path / "dump.pt")
    assert_drew_a_figure(notebook)
    expected = oracle_attribution(gpt2)
    assert torch.allclose(dumped["result"], expected, atol=1e-6)
    assert np.allclose(dumped["bars"][0], expected.numpy(), atol=1e-6)


def test_attention(env, gpt2, tmp_path):
    notebook, dumped = execute("attention", env, tmp_path / "dump.pt")
    assert_drew_a_figure(notebook)
    expected = oracle_attention(gpt2, layer=len(gpt2.transformer.h) // 2)
    assert torch.allclose(dumped["result"], expected, atol=1e-5)
    assert len(dumped["images"]) == expected.shape[0]  # one panel per head, each its pattern
    for image, pattern in zip(dumped["images"], expected, strict=True):
        assert np.allclose(image, pattern.numpy(), atol=1e-5)


def test_steering(env, gpt2, tmp_path):
    notebook, dumped = execute("steering", env, tmp_path / "dump.pt")
    assert_drew_a_figure(notebook)
    layer = len(gpt2.transformer.h) * 9 // 10
    expected = oracle_steering(gpt2, layer, steps=8)
    for (got_ids, got_sure), (want_ids, want_sure) in zip(dumped["result"], expected, strict=True):
        assert torch.equal(got_ids, want_ids)
        assert torch.allclose(got_sure, want_sure, atol=1e-5)
    assert not torch.equal(dumped["result"][0][1], dumped["result"][1][1])  # the edit reached the model
    assert [
        np.allclose(bars, sure.numpy(), atol=1e-5) for bars, (_, sure) in zip(dumped["bars"], expected, strict=True)
    ] == [True, True]


# -- interrupting a cell ----------------------------------------------------------------------------
SETUP = """
import nnfabric
fabric = nnfabric.connect()
model = fabric.model("tiny-gpt2")
"""
# Chained matrix products that keep the replica busy for seconds (and stay finite).
SLOW = """
with model.trace("The Eiffel Tower is in the city of", remote=True):
    x = model.transformer.h[0].output[0, 0, 0].expand(1500, 1500) * 0 + 1 / 1500
    y = x
    for _ in range(150):
        y = y @ x
    total = y.sum().save()
"""


def test_interrupting_a_cell_cancels_its_remote_job(fabric, gpt2_dir):
    from jupyter_client.manager import start_new_kernel

    key = new_key(fabric.settings.redis_url, "ivan")  # a user of its own: every job of it is the kernel's
    manager, kernel = start_new_kernel(kernel_name="python3", env=kernel_env(fabric, key, gpt2_dir))
    try:
        assert kernel.execute_interactive(SETUP, timeout=120)["content"]["status"] == "ok"
        sent = kernel.execute(SLOW)

        def running_job() -> dict | None:
            jobs = httpx.get(f"{fabric.url}/v1/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
            return next((job for job in jobs if job["state"] == "running"), None)

        job = wait_for(running_job, timeout=120, what="the cell's job to run")
        manager.interrupt_kernel()
        while True:
            reply = kernel.get_shell_msg(timeout=60)
            if reply["parent_header"].get("msg_id") == sent:
                break
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        shown = kernel.get_iopub_msg(timeout=30)
        while shown["msg_type"] != "error":
            shown = kernel.get_iopub_msg(timeout=30)
        assert f"job {job['id']} was cancelled on the fabric" in "\n".join(shown["content"]["traceback"])

        def state() -> str:
            headers = {"Authorization": f"Bearer {key}"}
            return httpx.get(f"{fabric.url}/v1/jobs/{job['id']}", headers=headers, timeout=30).json()["state"]

        # cancelled at once, and still cancelled once the replica is done with it
        assert wait_for(lambda: state() != "running" and state(), timeout=60, what="the job to end") == "cancelled"
    finally:
        kernel.stop_channels()
        manager.shutdown_kernel(now=True)
