"""A model split into pipeline stages runs every graph exactly as on one device.

The stages live in this process here (what crosses between them is deep-copied, as it would be
between processes); tests/topology/test_stages.py runs them as Ray actors on two nodes. The
oracle is always the same model in one piece (its own forward, generate and autograd).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nnfabric
import pytest
import torch
from nnfabric.errors import InterventionError

from services.common.catalog import ModelLimits, ModelSpec
from services.worker.executor import BatchExecutor
from services.worker.pipeline.links import local_pipeline
from services.worker.pipeline.plan import StagePlan
from services.worker.pipeline.weights import load_stage, shell_model
from tests.unit.test_batched_generate import gen_job, mixed_jobs, values

PROMPT = "The Eiffel Tower is in the city of"
PROMPTS = ["The Eiffel Tower is in", "Bob said that"]


class Kind:
    def __init__(self, name: str, directory: Path, layers: str, norm: str) -> None:
        self.name, self.directory, self.layers, self.norm = name, directory, layers, norm
        self.one = nnfabric.LanguageModel(str(directory))
        self.staged = nnfabric.LanguageModel(str(directory))
        self.staged._adapter = local_pipeline(str(directory), self.staged.tokenizer, 2)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def kind(request: pytest.FixtureRequest, gpt2_4_dir: Path, llama_4_dir: Path) -> Kind:
    if request.param == "gpt2":
        return Kind("gpt2", gpt2_4_dir, "transformer.h", "transformer.ln_f")
    return Kind("llama", llama_4_dir, "model.layers", "model.norm")


def at(model: Any, path: str) -> Any:
    for part in path.split("."):
        model = getattr(model, part)
    return model


def assert_all_equal(found: list[Any], expected: list[Any]) -> None:
    assert len(found) == len(expected)
    for a, b in zip(found, expected, strict=True):
        assert torch.equal(a, b)


def test_the_plan_balances_parameters_and_each_stage_loads_only_its_layers(kind: Kind) -> None:
    full = kind.one._module
    blocks = full.get_submodule(kind.layers)
    plan = kind.staged._adapter.plan
    assert plan.ranges == ((0, 2), (2, 4))
    assert plan.owner(f"{kind.layers}.3.mlp") == 1 and plan.owner(f"{kind.layers}.0") == 0
    assert plan.owner("lm_head") == 1 and plan.owner(kind.norm) == 1 and plan.owner("", "in") == 0
    per_layer = sum(p.numel() for p in blocks[0].parameters())
    for index, (start, stop) in enumerate(plan.ranges):
        stage = load_stage(str(kind.directory), plan, index)
        loaded = {n: p for n, p in stage.named_parameters() if p.device.type != "meta"}
        held = {n for n in loaded if n.startswith(f"{kind.layers}.")}
        assert {int(n.split(".")[len(kind.layers.split("."))]) for n in held} == set(range(start, stop))
        layer_params = sum(p.numel() for n, p in loaded.items() if n in held)
        assert layer_params == per_layer * (stop - start)
        for name, param in loaded.items():  # every weight it holds is the checkpoint's
            assert torch.equal(param, full.get_parameter(name)), name
        total = sum(p.numel() for p in loaded.values())
        assert total < sum(p.numel() for p in full.parameters())
    # Explicit ranges, checked.
    shell = shell_model(str(kind.directory))
    assert StagePlan.of(shell, [(0, 1), (1, 4)]).ranges == ((0, 1), (1, 4))
    for bad in ([(0, 2), (3, 4)], [(0, 2)], [(0, 0), (0, 4)]):
        with pytest.raises(ValueError, match="layer"):
            StagePlan.of(shell, bad)
    with pytest.raises(ValueError, match="ranges"):
        ModelSpec(name="m", source="x", stages=2, stage_layers=[(0, 4)])
    with pytest.raises(ValueError, match="1 GPU per stage"):
        ModelSpec(name="m", source="x", stages=2, gpus=4)


def lens_patch_and_grads(model: Any, kind: Kind) -> list[torch.Tensor]:
    """Logit lens over every layer, a stage-0 activation patched into a stage-1 layer, and the
    gradients of both stages' activations."""
    with model.trace(PROMPT):
        blocks, norm = at(model, kind.layers), at(model, kind.norm)
        first = blocks[0].output
        early = first[:, 2]
        lens = [model.lm_head(norm(blocks[i].output)).save() for i in range(3)]
        blocks[3].output[:, 1] = early
        last = blocks[3].output
        lens.append(model.lm_head(norm(last)).save())
        logits = model.lm_head.output.save()
        grads = [first.grad.save(), last.grad.save()]
        logits[:, -1, 5].sum().backward()
    return [t.value for t in [*lens, logits, *grads]]


def test_patching_logit_lens_and_gradients_equal_one_device(kind: Kind) -> None:
    expected = lens_patch_and_grads(kind.one, kind)
    assert_all_equal(lens_patch_and_grads(kind.staged, kind), expected)
    # The oracle for the gradient: a hand-written hook on the plain model.
    kept: dict[str, torch.Tensor] = {}
    handle = kind.one._module.get_submodule(kind.layers)[0].register_forward_hook(
        lambda m, a, o: kept.setdefault("h", o)
    )
    try:
        ids = torch.tensor([kind.one.tokenizer(PROMPT)["input_ids"]])
        out = kind.one._module(ids)
        kept["h"].retain_grad()
        out.logits[:, -1, 5].sum().backward()
    finally:
        handle.remove()
        kind.one._module.zero_grad(set_to_none=True)
    assert torch.allclose(expected[-2], kept["h"].grad, atol=1e-6)


def steered(model: Any, kind: Kind, **options: Any) -> list[torch.Tensor]:
    with model.generate(PROMPTS, max_new_tokens=6, **options) as tracer:
        blocks = at(model, kind.layers)
        logits = tracer.list().save()
        with tracer.all():
            blocks[1].output[:, -1] = blocks[1].output[:, -1] + 0.5  # stage 0
            blocks[2].output[:] = blocks[2].output * 1.25  # stage 1
            logits.append(model.lm_head.output[:, -1])
        out = tracer.output.save()
    return [out.value, *logits.value]


def test_steered_and_sampled_generation_equal_one_device(kind: Kind) -> None:
    assert_all_equal(steered(kind.staged, kind), steered(kind.one, kind))
    sampled = steered(kind.one, kind, do_sample=True, seed=3)
    assert_all_equal(steered(kind.staged, kind, do_sample=True, seed=3), sampled)
    assert not torch.equal(sampled[0], steered(kind.one, kind)[0])  # sampling was on


def test_early_stop_sessions_and_backward_from_an_early_layer(kind: Kind) -> None:
    def run(model: Any) -> list[torch.Tensor]:
        blocks = at(model, kind.layers)
        with model.trace(PROMPT) as tracer:
            kept = blocks[1].output.save()
            tracer.stop()
        with model.session():
            with model.trace(PROMPT):
                source = blocks[0].output[:, -1]
            with model.trace(PROMPTS[0]):
                blocks[3].output[:, -1] = source
                patched = model.lm_head.output.save()
        with model.trace(PROMPT):
            h0 = blocks[0].output
            h1 = blocks[1].output
            g0 = h0.grad.save()
            h1.sum().backward()  # a loss on stage 0: the backward stays there
            second = blocks[2].output
            (second * 2).sum().backward()  # a second backward, from stage 1 through stage 0
            g2 = second.grad.save()
            g0_again = h0.grad.save()
        return [kept.value, patched.value, g0.value, g2.value, g0_again.value]

    assert_all_equal(run(kind.staged), run(kind.one))


def test_weights_of_every_stage_can_be_read(kind: Kind) -> None:
    def run(model: Any) -> list[torch.Tensor]:
        embedding = "transformer.wte" if kind.name == "gpt2" else "model.embed_tokens"
        with model.trace(PROMPT):
            first = at(model, embedding).weight[:3].save()  # stage 0's, in a graph whose events are all on stage 1
            head = model.lm_head.weight[:3].save()
            out = model.lm_head.output.save()
        return [first.value, head.value, out.value]

    expected = run(kind.one)
    assert torch.equal(expected[0], kind.one._module.get_input_embeddings().weight[:3])
    assert_all_equal(run(kind.staged), expected)


def test_a_module_of_a_later_stage_used_before_the_run_reaches_it_fails_at_the_users_line(kind: Kind) -> None:
    model = kind.staged
    blocks, norm = at(model, kind.layers), at(model, kind.norm)
    with pytest.raises(InterventionError, match="lives on another stage") as caught:
        with model.trace(PROMPT):
            blocks[1].output[:] = norm(blocks[0].output)  # the final norm lives on stage 1
    assert caught.value.line is not None and "norm(blocks[0].output)" in caught.value.line.code
    with kind.one.trace(PROMPT):  # on one device the same line runs
        at(kind.one, kind.layers)[1].output[:] = at(kind.one, kind.norm)(at(kind.one, kind.layers)[0].output)


def test_jobs_merged_on_a_staged_model_keep_their_own_rows_and_failures(kind: Kind) -> None:
    spec = ModelSpec(name="staged", source="x", stages=2, limits=ModelLimits())
    pipeline = kind.staged._adapter
    staged = BatchExecutor(spec, pipeline.root, kind.staged.tokenizer, adapter=pipeline)
    one = BatchExecutor(ModelSpec(name="one", source="x", limits=ModelLimits()), kind.one._module, kind.one.tokenizer)
    jobs = {**mixed_jobs(kind.one), "hostile": gen_job(kind.one, PROMPTS[0], 4, bad_step=1)}
    merged = staged.run(list(jobs.items()))
    assert not merged["hostile"].ok and "index" in (merged["hostile"].error or "")
    for name, payload in jobs.items():
        if name == "hostile":
            continue
        ids, logits = values(merged[name])
        solo_ids, solo_logits = values(one.run([(name, payload)])[name])
        assert torch.equal(ids, solo_ids), name
        assert torch.allclose(logits, solo_logits, atol=1e-5), name


def test_attention_weights_and_every_hidden_state_come_back_whole(kind: Kind) -> None:
    def run(model: Any) -> Any:
        with model.trace(PROMPTS, output_attentions=True, output_hidden_states=True):
            out = model.output.save()
            first = (model.output.attentions[0] * 2).save()  # used inside the graph, on the last stage
        return out.value, first.value

    (expected, first_expected), (found, first_found) = run(kind.one), run(kind.staged)
    assert torch.equal(first_found, first_expected)
    assert len(found["attentions"]) == len(expected["attentions"]) == 4
    assert_all_equal(list(found["attentions"]), list(expected["attentions"]))
    assert_all_equal(list(found["hidden_states"]), list(expected["hidden_states"]))
    assert torch.equal(found["logits"], expected["logits"])
