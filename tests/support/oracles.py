"""Independent oracles for the tests: the plain model run by hand, hand-written PyTorch hooks."""

from __future__ import annotations

import nnfabric
import torch


def hooks_of(model: torch.nn.Module) -> list[tuple[int, ...]]:
    """Every module's forward hooks (ids): transformers keeps hooks of its own on a model once it
    was asked for hidden states or attentions, so "no hooks of ours left" compares with before."""
    return [tuple(m._forward_hooks) + tuple(m._forward_pre_hooks) for m in model.modules()]


def ids(model: nnfabric.LanguageModel, text: str) -> torch.Tensor:
    return torch.tensor([model.tokenizer(text)["input_ids"]])


def plain_logits(model: nnfabric.LanguageModel, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model._module(ids(model, text)).logits


class Hook:
    """A hand-written forward hook: the independent oracle for reads and edits."""

    def __init__(self, module: torch.nn.Module, edit=None) -> None:  # type: ignore[no-untyped-def]
        self.seen: list = []
        self.edit = edit
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):  # type: ignore[no-untyped-def]
        self.seen.append(output)
        return self.edit(output) if self.edit else None

    def __enter__(self) -> Hook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def key_of(user: str):  # type: ignore[no-untyped-def]
    """An API key record for `user` (the store's submit takes one), without creating a key."""
    from services.common.store import ApiKey

    return ApiKey(f"key-{user}", user, ["*"], 0, 0.0)
