"""One stage's model: the whole module tree, its own layers with their weights, the rest stubs.

    shell = shell_model(directory)                  # every module, no weights (meta device)
    model = load_stage(directory, plan, 1)          # reads only stage 1's weights
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Any

import torch

from .plan import StagePlan


class _LayerStub(torch.nn.Module):
    """A layer another stage holds: its input passes through (it is replaced or never used)."""

    def forward(self, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        return hidden_states


class _EmbeddingStub(torch.nn.Module):
    """An embedding of the first stage, on a later stage: zeros of the right shape (the first
    layer's input is replaced by the hidden state the stage receives)."""

    def __init__(self, width: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.width = width
        self.dtype = dtype

    def forward(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.width, dtype=self.dtype, device=ids.device)


class _PassStub(torch.nn.Module):
    def forward(self, value: Any, *args: Any, **kwargs: Any) -> Any:
        return value


def shell_model(source: str, dtype: torch.dtype = torch.float32) -> Any:
    """The whole model's modules with no weights in memory (meta device): its tree and config."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(source)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(source)
    model.train(False)
    return model


def load_stage(source: str, plan: StagePlan, index: int, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> Any:  # fmt: skip
    """Stage `index` of the model in directory `source`: only its weights are read from the
    safetensors checkpoint; every other module is a stub or stays on the meta device."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    model = shell_model(source, dtype)
    aliases: dict[int, list[str]] = {}  # tied weights (a head that is the embedding) share one checkpoint key
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    alias_of = {name: names for names in aliases.values() for name in names}
    tied = getattr(model, "_tied_weights_keys", None)
    if isinstance(tied, dict) and getattr(model.config, "tie_word_embeddings", False):
        for target, origin in tied.items():
            alias_of[target] = [*alias_of.get(target, []), origin]
    blocks = model.get_submodule(plan.layers)
    start, stop = plan.ranges[index]
    for layer in range(len(blocks)):
        if not start <= layer < stop:
            blocks[layer] = _LayerStub()
    if index > 0:
        replaced: list[str] = []
        for name, module in list(model.named_modules()):
            if not name or plan.owner(name) != 0 or name == plan.layers or plan.layers.startswith(f"{name}."):
                continue
            if any(name.startswith(f"{done}.") for done in replaced) or next(module.parameters(recurse=False), None) is None:
                continue
            embedding = isinstance(module, torch.nn.Embedding)
            _replace(model, name, _EmbeddingStub(module.embedding_dim, dtype) if embedding else _PassStub())
            replaced.append(name)
    files = sorted(Path(source).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"a staged model needs a safetensors checkpoint in {source}")
    where = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), file))
    wanted = [
        name
        for name, _ in itertools.chain(
            model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
        )
        if plan.holds(name.rsplit(".", 1)[0], index)
    ]
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in wanted:
        key = name if name in where else next((a for a in alias_of.get(name, []) if a in where), None)
        if key is None:
            if name in params:
                raise KeyError(f"the checkpoint in {source} has no weight for {name}")
            continue  # a buffer the model computes itself
        with safe_open(str(where[key]), framework="pt", device="cpu") as handle:
            value = handle.get_tensor(key)
        set_module_tensor_to_device(model, name, device, value=value, dtype=dtype if value.is_floating_point() else None)
    for param in model.parameters():
        if param.device.type != "meta":
            param.requires_grad_(True)  # as the one-stage loader: gradients reach every weight's input
    return model


def _replace(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)
