from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import nnfabric
import nnfabric.backends
from models import build_gpt2, build_llama, build_mlp

# The cluster topology test starts a Ray cluster of its own: it runs in a pytest run of its own
# (`make test` runs it after this one), never beside the session fabric's Ray.
collect_ignore = [] if os.environ.get("NNFABRIC_TOPOLOGY") else ["topology"]


@pytest.fixture(autouse=True)
def _through_the_wire(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every local trace in the suite runs on the loopback backend (`remote="local"`): encode ->
    # decode -> execute -> encode -> decode, exactly as a remote job travels, with local limits.
    monkeypatch.setattr(nnfabric.backends, "DEFAULT_LOCAL", "loopback")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("gpt2")
    build_gpt2(directory)
    return directory


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    build_llama(directory)
    return directory


@pytest.fixture(scope="session")
def gpt2_4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer GPT-2, to split into pipeline stages."""
    directory = tmp_path_factory.mktemp("gpt2-4")
    build_gpt2(directory, layers=4)
    return directory


@pytest.fixture(scope="session")
def llama_4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("llama-4")
    build_llama(directory, layers=4)
    return directory


@pytest.fixture(scope="session")
def gpt2(gpt2_dir: Path) -> nnfabric.LanguageModel:
    return nnfabric.LanguageModel(str(gpt2_dir))


@pytest.fixture(scope="session")
def llama(llama_dir: Path) -> nnfabric.LanguageModel:
    return nnfabric.LanguageModel(str(llama_dir))


@pytest.fixture
def mlp() -> nnfabric.Model:
    return nnfabric.Model(build_mlp())


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


@pytest.fixture(scope="module")
def redis_url():
    """A real Redis of the module's own (nothing kept)."""
    from services.common.redis_server import RedisServer

    server = RedisServer.start()
    yield server.url
    server.stop()


def key_of(user: str):  # type: ignore[no-untyped-def]
    """An API key record for `user` (the store's submit takes one), without creating a key."""
    from services.common.store import ApiKey

    return ApiKey(f"key-{user}", user, ["*"], 0, 0.0)


@pytest.fixture(scope="session")
def fabric(tmp_path_factory: pytest.TempPathFactory, gpt2_dir: Path):
    from fabric import start_fabric, stop_fabric

    running = start_fabric(tmp_path_factory.mktemp("fabric"), gpt2_dir)
    yield running
    stop_fabric(running)


@pytest.fixture
def alice(fabric, gpt2_dir):
    """A local model object that runs on the fabric when asked (remote=True)."""
    nnfabric.connect(fabric.url, fabric.keys["alice"], progress=False)
    return nnfabric.LanguageModel(str(gpt2_dir), remote_name="tiny-gpt2")
