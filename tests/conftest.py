from __future__ import annotations

import os
from pathlib import Path

import nnfabric
import nnfabric.backends
import pytest

from tests.support.models import build_gpt2, build_llama, build_mlp

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


@pytest.fixture(scope="module")
def redis_url():
    """A real Redis of the module's own (nothing kept)."""
    from services.common.redis_server import RedisServer

    server = RedisServer.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def fabric(tmp_path_factory: pytest.TempPathFactory, gpt2_dir: Path):
    from tests.support.fabric import start_fabric, stop_fabric

    running = start_fabric(tmp_path_factory.mktemp("fabric"), gpt2_dir)
    yield running
    stop_fabric(running)


@pytest.fixture
def alice(fabric, gpt2_dir):
    """A local model object that runs on the fabric when asked (remote=True)."""
    nnfabric.connect(fabric.url, fabric.keys["alice"], progress=False)
    return nnfabric.LanguageModel(str(gpt2_dir), remote_name="tiny-gpt2")
