"""Tiny, seeded models and an offline-trained tokenizer, built the way real ones are loaded."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "The Eiffel Tower is in the city of Paris.",
    "The Colosseum is in the city of Rome.",
    "The capital of France is Paris and the capital of Italy is Rome.",
    "Alice went to the market and bought apples, pears and bread.",
    "Bob said that the weather was nice today in London.",
    "One two three four five six seven eight nine ten.",
] * 20


def train_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>", "<eos>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    fast.save_pretrained(directory)


def build_gpt2(directory: Path, layers: int = 2, width: int = 64, vocab: int = 300) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=4,
        vocab_size=vocab,
        n_positions=128,
        pad_token_id=1,
        eos_token_id=2,
        bos_token_id=2,
    )
    GPT2LMHeadModel(config).eval().save_pretrained(directory)
    train_tokenizer(directory)


def build_llama(directory: Path, layers: int = 2) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=128,
        pad_token_id=1,
        eos_token_id=2,
        bos_token_id=2,
    )
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    train_tokenizer(directory)


def build_mlp() -> torch.nn.Sequential:
    torch.manual_seed(2)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
