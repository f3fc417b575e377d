"""nnfabric: read, edit and take gradients of any module inside a `with model.trace(...)` block.

    import nnfabric
    model = nnfabric.LanguageModel("openai-community/gpt2")
    with model.trace("The Eiffel Tower is in the city of"):
        hidden = model.transformer.h[5].output[0].save()

The block builds an intervention graph (data, never code) that runs locally, or on the fabric
with `remote=True`.
"""

from .errors import GraphError, InterventionError, RemoteError
from .models import LanguageModel, Model
from .remote.client import Job, Session, connect, job

__version__ = "0.1.0"

__all__ = [
    "GraphError",
    "InterventionError",
    "Job",
    "LanguageModel",
    "Model",
    "RemoteError",
    "Session",
    "__version__",
    "connect",
    "job",
]
