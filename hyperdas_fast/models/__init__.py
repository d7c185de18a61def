"""HyperDAS models: target-model adapters, hypernetwork, position selector, subspace modules
and the ``HyperDAS`` API (see ``hyperdas.py``)."""
from .adapters import SUPPORTED_MODEL_TYPES, get_adapter
from .hyperdas import HyperDAS, HyperDASModel, HyperDASOutput
from .mdas import MDAS

__all__ = ["HyperDAS", "HyperDASModel", "HyperDASOutput", "MDAS", "get_adapter", "SUPPORTED_MODEL_TYPES"]
