"""hyperdas_fast: fast HyperDAS interchange interventions."""
__version__ = "0.1.0"

