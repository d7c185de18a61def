"""RAVEL data (``ravel.py``) and the batch collator (``collate.py``)."""
from .collate import HyperDASCollator

__all__ = ["HyperDASCollator"]
