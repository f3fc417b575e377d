import nnfabric
import pytest
import torch


def test_attribute_access_mirrors_the_module_tree(gpt2):
    assert gpt2.transformer.h[1].mlp._path == "transformer.h.1.mlp"
    assert gpt2.transformer.h[-1]._path == "transformer.h.1"
    assert [e._path for e in gpt2.transformer.h] == ["transformer.h.0", "transformer.h.1"]
    assert len(gpt2.transformer.h) == 2


def test_print_shows_every_module_with_its_type(gpt2):
    text = repr(gpt2)
    for name, module in gpt2._module.named_modules():
        if name:
            assert f"{name.rsplit('.', 1)[-1]}: {type(module).__name__}" in text


def test_invalid_path_names_the_nearest_real_one(gpt2):
    with pytest.raises(AttributeError, match=r"did you mean 'transformer\.h'"):
        gpt2.transformer.hh  # noqa: B018
    with pytest.raises(IndexError, match=r"has 2 modules \(0..1\)"):
        gpt2.transformer.h[5]


def test_non_module_attributes_reach_the_module(gpt2):
    assert gpt2.config is gpt2._module.config
    assert gpt2.transformer.wte.weight is gpt2._module.transformer.wte.weight


def test_outputs_need_a_trace(gpt2):
    with pytest.raises(RuntimeError, match=r"only available inside model\.trace"):
        gpt2.transformer.h[0].output  # noqa: B018


def test_calling_an_envoy_outside_a_trace_runs_the_module(mlp):
    x = torch.randn(2, 4)
    assert torch.equal(mlp[0](x), mlp._module[0](x))


def test_language_model_from_a_built_model_needs_a_tokenizer(gpt2):
    with pytest.raises(ValueError, match="tokenizer="):
        nnfabric.LanguageModel(gpt2._module)
    wrapped = nnfabric.LanguageModel(gpt2._module, tokenizer=gpt2.tokenizer)
    with wrapped.trace("Paris"):
        out = wrapped.lm_head.output.save()
    assert out.shape[-1] == 300
