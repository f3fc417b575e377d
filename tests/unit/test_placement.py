"""Every tensor the runtime makes or receives meets the device of what consumes it, checked on
this CPU with a second device type: "meta" (shapes, no data). A GPU's kernels refuse tensors
from another device; the modules here do the same, so a tensor left behind on the CPU fails
the test as it would fail on a GPU.

- token ids, masks and positions arrive where the model's input embedding is (traces, padded
  batches, the replica's executor, generation);
- a job's own tensors, a value from another invoke or another trace of a session, a persistent
  edit's tensors, and a module called on a value (logit lens) meet the model's value where it is.
"""

from __future__ import annotations

import nnfabric
import pytest
import torch
from nnfabric.graph import Graph, Invoke, Node
from nnfabric.runtime.adapters import CausalLMAdapter
from nnfabric.runtime.execute import run_graph
from nnfabric.runtime.wire import pack_request

from services.common.catalog import ModelSpec
from services.worker.executor import BatchExecutor

PROMPT = "The Eiffel Tower is in the city of"
SHORT = "Alice went"


class Arrived(Exception):
    """Raised by the check below once the inputs have been seen: the forward goes no further."""


def inputs_seen_on(model: torch.nn.Module) -> tuple[dict[str, torch.device], torch.utils.hooks.RemovableHandle]:
    """A pre-hook on the model that records where each tensor input arrived, then stops."""
    seen: dict[str, torch.device] = {}

    def hook(module, args, kwargs):  # type: ignore[no-untyped-def]
        for name, value in [*((f"arg{i}", a) for i, a in enumerate(args)), *kwargs.items()]:
            if isinstance(value, torch.Tensor):
                seen[name] = value.device
        raise Arrived(str(seen))

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.fixture
def meta_embedded(gpt2_dir):
    """The tiny GPT-2 with its input embedding on another device (as on a GPU, or the first GPU
    of several)."""
    model = nnfabric.LanguageModel(str(gpt2_dir))
    model._module.transformer.wte.to("meta")
    return model


def trace_graph(*prompts: str) -> Graph:
    graph = Graph()
    for prompt in prompts:
        graph.invokes.append(Invoke(args=[prompt]))
    graph.saves.append(graph.add(Node("output", ["transformer.h.0", 0, 0])).id)
    return graph


@pytest.mark.parametrize("prompts", [[PROMPT], [PROMPT, SHORT]], ids=["one-prompt", "padded-batch"])
def test_token_ids_masks_and_positions_arrive_where_the_embedding_is(meta_embedded, prompts):
    seen, handle = inputs_seen_on(meta_embedded._module)
    try:
        with pytest.raises(Arrived):
            run_graph(trace_graph(*prompts), {}, CausalLMAdapter(meta_embedded._module, meta_embedded.tokenizer))
    finally:
        handle.remove()
    assert seen["input_ids"].type == "meta", seen
    if len(prompts) > 1:  # padded: the mask and positions travel too
        assert seen["attention_mask"].type == "meta" and seen["position_ids"].type == "meta", seen


def test_token_ids_given_as_a_cpu_tensor_arrive_where_the_embedding_is(meta_embedded):
    ids = torch.tensor([meta_embedded.tokenizer(PROMPT)["input_ids"]])
    graph = Graph()
    graph.invokes.append(Invoke(args=[ids]))
    graph.saves.append(graph.add(Node("output", ["transformer.h.0", 0, 0])).id)
    seen, handle = inputs_seen_on(meta_embedded._module)
    try:
        with pytest.raises(Arrived):
            run_graph(graph, {}, CausalLMAdapter(meta_embedded._module, meta_embedded.tokenizer))
    finally:
        handle.remove()
    assert seen["input_ids"].type == "meta", seen


def test_generation_inputs_are_handed_over_where_the_embedding_is(meta_embedded, monkeypatch):
    seen: dict[str, torch.device] = {}

    def generate(**kwargs):  # type: ignore[no-untyped-def]
        seen.update({k: v.device for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        raise Arrived(str(seen))

    monkeypatch.setattr(meta_embedded._module, "generate", generate)
    graph = trace_graph(PROMPT, SHORT)
    graph.kind, graph.options = "generate", {"max_new_tokens": 2}
    with pytest.raises(Arrived):
        run_graph(graph, {}, CausalLMAdapter(meta_embedded._module, meta_embedded.tokenizer))
    assert seen["input_ids"].type == "meta" and seen["attention_mask"].type == "meta", seen


def test_the_replicas_executor_hands_the_model_its_inputs_on_the_embeddings_device(meta_embedded):
    executor = BatchExecutor(ModelSpec(name="tiny", source="x"), meta_embedded._module, meta_embedded.tokenizer)
    seen, handle = inputs_seen_on(meta_embedded._module)
    try:
        outcomes = executor.run([("a", pack_request(trace_graph(PROMPT), {})), ("b", pack_request(trace_graph(SHORT), {}))])
    finally:
        handle.remove()
    for outcome in outcomes.values():
        assert outcome.error is not None and "Arrived" in outcome.error  # stopped at the check, not before
    assert seen and all(device.type == "meta" for device in seen.values()), seen


class OnDevice(torch.nn.Module):
    """A layer whose weight lives on `device` and which, like a GPU kernel, refuses an input
    from another device."""

    def __init__(self, device: str, width: int = 4) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.eye(width, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device != self.weight.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found {x.device} and "
                               f"{self.weight.device}")  # fmt: skip
        return x @ self.weight


class Hop(torch.nn.Module):
    """Where accelerate's hook moves activations between layers split over two devices."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = torch.device(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device)


@pytest.fixture
def split():
    """Layer 0 on the CPU, layers 2 and 3 on the other device."""
    return nnfabric.Model(torch.nn.Sequential(OnDevice("cpu"), Hop("meta"), OnDevice("meta"), OnDevice("meta")))


X = torch.ones(2, 4)


@pytest.mark.parametrize("remote", [False, "local"], ids=["local", "through-the-wire"])
def test_a_jobs_own_tensors_meet_the_models_value_where_it_is(split, remote):
    direction = torch.arange(8.0).reshape(2, 4)  # carried by the job, on the CPU
    with split.trace(X, remote=remote):
        split[2].output = split[2].output + direction
        split[2].output[:, 0] = torch.zeros(2)  # a value the graph makes, on the CPU
        out = split.output.save()
    assert out.value.device.type == "meta" and out.value.shape == (2, 4)


def test_a_value_from_another_invoke_is_written_where_the_model_holds_its_rows(split):
    with split.trace() as tracer:
        with tracer.invoke(X):
            early = split[0].output  # on the CPU
        with tracer.invoke(X * 2):
            split[3].input = early  # into a layer on the other device
            split[3].output.save()


def test_a_module_called_on_a_value_gets_it_where_the_module_computes(split):
    with split.trace(X):
        early = split[0].output  # on the CPU
        lens = split[3](early).save()  # a layer on the other device, called on it
    assert lens.value.device.type == "meta"


def test_a_value_from_an_earlier_trace_of_a_session_meets_the_model_where_it_is(split):
    with split.session():
        with split.trace(X):
            early = split[0].output
        with split.trace(X):
            split[2].output = split[2].output + early
            out = split.output.save()
    assert out.value.device.type == "meta"


def test_a_persistent_edits_tensors_meet_the_models_value(split):
    with split.edit() as shifted:
        split[2].output = split[2].output + torch.full((2, 4), 3.0)
    with shifted.trace(X):
        out = shifted.output.save()
    assert out.value.device.type == "meta"


def test_a_gpu_replica_shards_its_model_within_each_gpus_memory_share(monkeypatch):
    from services.worker.loader import placement

    class Properties:
        total_memory = 80 << 30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Properties())
    spec = ModelSpec(name="big", source="x", dtype="bfloat16", gpus=2)
    plan = placement(spec)
    assert plan["device_map"] == "auto" and plan["max_memory"] == {0: int(0.85 * (80 << 30)), 1: int(0.85 * (80 << 30))}
    offloaded = placement(spec.model_copy(update={"offload": True}))
    assert offloaded["max_memory"]["cpu"] > 0  # layers that do not fit the GPUs go to the CPU
    assert placement(spec.model_copy(update={"gpus": 0})) == {}  # a CPU replica: no device map
