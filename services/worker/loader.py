"""Load a catalog model: a local directory, a Hugging Face repo id, or a GGUF file.

    model, tokenizer = load_model(spec)        # accelerate places it over the visible GPUs

A GGUF file is converted once into a safetensors cache (NNFABRIC_CACHE_DIR, by default
~/.cache/nnfabric), so later starts load the cache directly.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any
from unittest.mock import patch

import torch

from ..common.catalog import ModelSpec
from ..common.settings import Settings


def dtype_named(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"unsupported dtype {name!r}; use one of {sorted(table)}")
    return table[name]


def convert_gguf(path: Path, dtype: torch.dtype, cache_dir: str) -> Path:
    """GGUF -> a safetensors directory (transformers refuses to save a GGUF-loaded model)."""
    target = Path(cache_dir).expanduser() / f"{path.stem}-{path.stat().st_size}-{str(dtype).removeprefix('torch.')}"
    if (target / "config.json").exists():
        return target
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # transformers parses the file anew for the config, the weights and the tokenizer (~30 s per
    # parse of a 100 MB GGUF on a small CPU) and rebuilds the same tensor-name table once per
    # submodule (~50 s); one parse and one table serve them all.
    reader = gguf.GGUFReader(path)
    with (
        patch.object(gguf, "GGUFReader", lambda _path, *args, **kwargs: reader),
        patch.object(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map)),
    ):
        source = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
        config = AutoConfig.from_pretrained(**source)
        loaded = AutoModelForCausalLM.from_pretrained(**source, config=config, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(**source)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=dtype)
    rebuilt.load_state_dict(loaded.state_dict(), strict=False)
    if getattr(rebuilt.config, "tie_word_embeddings", False):
        rebuilt.tie_weights()
    # Written beside the target and renamed into place, so an interrupted conversion never
    # leaves a cache that looks complete.
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    rebuilt.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def prepare(spec: ModelSpec, cache_dir: str | None = None) -> str:
    """Where transformers loads the model from: a GGUF file is converted (once) first.

    Run it where a person watches (the launcher does) so the slow conversion shows progress.
    """
    path = Path(spec.source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model {spec.name!r}: no GGUF file at {path}")
        return str(convert_gguf(path, dtype_named(spec.dtype), cache_dir or Settings().cache_dir))
    return str(path) if path.is_dir() else spec.source


def placement(spec: ModelSpec) -> dict[str, Any]:
    """How accelerate places a replica's model: nothing on a CPU replica; on GPUs, a device map
    over the GPUs Ray gave the replica (CUDA_VISIBLE_DEVICES), each GPU filled up to
    `gpu_memory_fraction` of its memory, and the CPU's memory for the rest when `offload`."""
    if spec.gpus == 0 or not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return {}
    max_memory: dict[int | str, int] = {
        index: int(torch.cuda.get_device_properties(index).total_memory * spec.gpu_memory_fraction)
        for index in range(torch.cuda.device_count())
    }
    if spec.offload:
        import psutil

        max_memory["cpu"] = int(psutil.virtual_memory().available * 0.8)
    return {"device_map": "auto", "max_memory": max_memory}


def load_model(spec: ModelSpec) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype_named(spec.dtype)
    source = prepare(spec)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement(spec))
    model.train(False)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or source)
    return model, tokenizer


def tokenizer_files(tokenizer: Any) -> dict[str, str]:
    """The tokenizer as text files, for thin clients that load it without the model."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {
            p.name: p.read_text()
            for p in Path(tmp).iterdir()
            if p.is_file() and p.suffix in (".json", ".txt", ".model") and p.suffix != ".model"
        }
