"""Load a catalog model: a local directory, a Hugging Face repo id, or a GGUF file.

    model, tokenizer = load_model(spec)        # accelerate places it over the visible GPUs

A GGUF file is converted once into a safetensors cache beside it (or in NNFABRIC_CACHE), so
later starts load the cache directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..common.catalog import ModelSpec


def _dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"unsupported dtype {name!r}; use one of {sorted(table)}")
    return table[name]


def gguf_cache_dir(path: Path) -> Path:
    root = Path(os.environ.get("NNFABRIC_CACHE", Path.home() / ".cache" / "nnfabric"))
    return root / f"{path.stem}-{path.stat().st_size}"


def convert_gguf(path: Path, dtype: torch.dtype) -> Path:
    """GGUF -> a safetensors directory (transformers refuses to save a GGUF-loaded model)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = gguf_cache_dir(path)
    if (target / "config.json").exists():
        return target
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=dtype)
    rebuilt.load_state_dict(loaded.state_dict(), strict=False)
    if getattr(rebuilt.config, "tie_word_embeddings", False):
        rebuilt.tie_weights()
    target.mkdir(parents=True, exist_ok=True)
    rebuilt.save_pretrained(target)
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(target)
    return target


def load_model(spec: ModelSpec) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _dtype(spec.dtype)
    source = spec.source
    path = Path(source)
    if path.suffix == ".gguf" and path.exists():
        source = str(convert_gguf(path, dtype))
    kwargs: dict[str, Any] = {"dtype": dtype}
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        kwargs["device_map"] = "auto"  # accelerate shards over the GPUs Ray gave this replica
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
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
