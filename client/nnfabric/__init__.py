"""nnfabric: read, edit and take gradients of any module inside a `with model.trace(...)` block.

    import nnfabric
    model = nnfabric.LanguageModel("openai-community/gpt2")
    with model.trace("The Eiffel Tower is in the city of"):
        hidden = model.transformer.h[5].output[0].save()

The block builds an intervention graph (data, never code) that runs locally, or on the fabric
with `remote=True`. Names load on first use, so `import nnfabric.graph` (what the gateway
needs) pulls in neither torch nor the HTTP client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "GraphError": ".errors",
    "InterventionError": ".errors",
    "RemoteError": ".errors",
    "LanguageModel": ".models",
    "Model": ".models",
    "Fabric": ".fabric",
    "connect": ".fabric",
    "job": ".fabric",
    "Job": ".remote.job",
}

if TYPE_CHECKING:
    from .errors import GraphError, InterventionError, RemoteError
    from .fabric import Fabric, connect, job
    from .models import LanguageModel, Model
    from .remote.job import Job


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nnfabric' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "Fabric",
    "GraphError",
    "InterventionError",
    "Job",
    "LanguageModel",
    "Model",
    "RemoteError",
    "__version__",
    "connect",
    "job",
]
