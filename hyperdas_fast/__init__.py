"""hyperdas_fast: fast, dependable HyperDAS interchange interventions.

    from hyperdas_fast import HyperDAS, MDAS, interchange
"""
from .ops import KEEP, interchange, interchange_hard, interchange_triples

__version__ = "0.1.0"


def __getattr__(name):
    # The model API pulls in transformers; import it only when asked for.
    if name in ("HyperDAS", "HyperDASModel"):
        from .models import hyperdas

        return getattr(hyperdas, name)
    if name == "MDAS":
        from .models import mdas

        return mdas.MDAS
    raise AttributeError(f"module 'hyperdas_fast' has no attribute {name!r}")


__all__ = ["HyperDAS", "HyperDASModel", "MDAS", "KEEP", "interchange", "interchange_hard", "interchange_triples"]
