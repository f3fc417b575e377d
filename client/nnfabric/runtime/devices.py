"""Where tensors go: every tensor the runtime makes or receives meets the device of the module
or op that consumes it, and saved values come back to the host.

Usage::

    device = input_device(hf_model)             # where token ids, masks and positions go
    args, kwargs = aligned("binary", args, kwargs)  # one device for an op's tensors
    saved = to_host(saved)                      # device tensors -> CPU, one copy per device and dtype

A model may sit on one GPU, be split by accelerate over several (each layer's hook moves its
inputs), have layers offloaded to the CPU (their weights on "meta" until the hook loads them),
or be one pipeline stage. Values a job carries arrive on the CPU; values it reads from the
model are wherever their layer ran. An op that mixes them runs where the model's value is.
"""

from __future__ import annotations

from typing import Any

import torch

_CPU = torch.device("cpu")
# Saved values of one device and dtype are copied to the host in one piece (one wait for the
# device, not one per value) unless that piece would be larger than this.
_ONE_COPY_BYTES = 256 << 20


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in `value`, in order, inside any list, tuple (named ones and torch's
    return types too) or dict (model outputs too)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _rebuilt(value: Any, fn: Any) -> Any:
    """`value` with `fn` applied to each tensor, every container rebuilt as its own type."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, list):
        return [_rebuilt(v, fn) for v in value]
    if isinstance(value, tuple):
        items = [_rebuilt(v, fn) for v in value]
        if type(value) is tuple:
            return tuple(items)
        try:  # a named tuple takes its fields; torch's return types take one sequence
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        except TypeError:
            return tuple(items)
    if isinstance(value, dict):
        entries = {k: _rebuilt(v, fn) for k, v in value.items()}
        if type(value) is dict:
            return entries
        try:  # a model output (transformers' ModelOutput) takes its fields by name
            return type(value)(**entries)
        except TypeError:
            return entries
    return value


def _hook_device(module: torch.nn.Module) -> torch.device | None:
    """The device accelerate runs a module on (its hook's execution device), if it has one."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is None:
        return None
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def module_device(module: torch.nn.Module) -> torch.device | None:
    """Where `module` computes: its accelerate hook's device, else that of its first weight that
    is not on "meta" (an offloaded one waits there for its hook), else "meta" when every weight
    is there, else None (a module without weights)."""
    hooked = _hook_device(module)
    if hooked is not None:
        return hooked
    found = None
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type != "meta":
            return tensor.device
        found = tensor.device
    return found


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: its input embedding's device (as Hugging Face's generate
    does), else its first weight's."""
    embeddings = getattr(model, "get_input_embeddings", None)
    if embeddings is not None:
        try:
            found = embeddings()
        except (NotImplementedError, AttributeError):
            found = None
        if isinstance(found, torch.nn.Module):
            hooked = _hook_device(found)
            if hooked is not None:
                return hooked
            weight = getattr(found, "weight", None)
            if isinstance(weight, torch.Tensor):
                return weight.device
    return module_device(model) or _CPU


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it on `device` (those already there untouched)."""
    if all(t.device == device for t in _tensors(value)):
        return value
    return _rebuilt(value, lambda t: t if t.device == device else t.to(device))


def first_device(value: Any) -> torch.device | None:
    found = _tensors(value)
    return found[0].device if found else None


def aligned(op: str, args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """An op's arguments on one device: where its tensors already agree, as they are; else on the
    target's device for a `setitem` (the tensor being written into), otherwise on the first
    device that is not the CPU (a model's value; a job's own tensors arrive on the CPU)."""
    devices: list[torch.device] = []
    for tensor in _tensors((args, kwargs)):
        if tensor.device not in devices:
            devices.append(tensor.device)
    if len(devices) < 2:
        return args, kwargs
    if op == "setitem" and isinstance(args[0], torch.Tensor):
        target = args[0].device
    else:
        target = next((d for d in devices if d.type != "cpu"), devices[0])
    return to_device(args, target), to_device(kwargs, target)


def to_host(values: Any) -> Any:
    """Every tensor in `values` on the CPU (detached); tensors already there, and the data-less
    ones of a scan, stay as they are. Device tensors of one device and dtype travel together:
    one copy, so the host waits for the device once per batch, not once per value."""
    on_device = [t for t in _tensors(values) if t.device.type not in ("cpu", "meta")]
    if not on_device:
        return values
    copied: dict[int, torch.Tensor] = {}
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in on_device:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    for group in groups.values():
        unique = list({id(t): t for t in group}.values())
        if len(unique) == 1 or sum(t.numel() * t.element_size() for t in unique) > _ONE_COPY_BYTES:
            for tensor in unique:
                copied[id(tensor)] = tensor.detach().cpu()
            continue
        flat = torch.cat([t.detach().reshape(-1) for t in unique]).cpu()
        for tensor, piece in zip(unique, flat.split([t.numel() for t in unique]), strict=True):
            copied[id(tensor)] = piece.view(tensor.shape)
    return _rebuilt(values, lambda t: copied.get(id(t), t))
