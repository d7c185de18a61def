"""Subspace modules: concept embedding [B, d] -> (basis [d, k], reflect [B, d] | None, mask | None).

All four modules of the paper feed the same op (``hyperdas_fast.ops.interchange``):

- ``ReflectSelect`` (default): a learned orthonormal basis R shared by all examples and a
  per-example Householder reflection v = normalize(SwiGLU(RMSNorm(h))); R_b = (I - 2vv^T) R.
- ``MaskSelect``: learned basis R and a per-example gate m = sigmoid(Linear(h) / temperature) [B, k].
- ``DAS``: a learned basis R only (concept-independent).
- ``BoundlessDAS``: a full rotation (k = d) with a learned sigmoid boundary mask
  m_i = sigmoid((boundary - i) / temperature) [d].

The orthogonal parametrization (torch.nn.utils.parametrizations.orthogonal) is evaluated
once per call of ``forward`` (once per training step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

SUBSPACES = ("reflect", "mask", "das", "boundless")


class OrthogonalBasis(nn.Module):
    """A [d, k] matrix with orthonormal columns; ``forward()`` evaluates it once.

    The parameter and the parametrization stay in float32 (half-precision QR / matrix_exp
    are unsupported or inaccurate); the result is cast to ``dtype`` (the model's)."""

    def __init__(self, hidden_size: int, k: int, dtype=None, device=None):
        super().__init__()
        self.out_dtype = dtype or torch.float32
        self.linear = orthogonal(nn.Linear(k, hidden_size, bias=False, dtype=torch.float32, device=device))

    def forward(self) -> Tensor:
        return self.linear.weight.to(self.out_dtype)  # [d, k]


class _RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SubspaceModule(nn.Module):
    """Base class: ``forward(concept [B, d]) -> (basis [d, k], reflect [B, d] | None, mask [B, k] | [k] | None)``."""

    basis: OrthogonalBasis

    def basis_parameters(self):
        """The parameters of the orthogonal basis (own learning rate, no weight decay)."""
        return list(self.basis.parameters())


class ReflectSelect(SubspaceModule):
    def __init__(self, hidden_size: int, k: int, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.basis = OrthogonalBasis(hidden_size, k, **kw)
        self.norm = _RMSNorm(hidden_size, **kw)
        self.gate = nn.Linear(hidden_size, hidden_size, bias=False, **kw)
        self.up = nn.Linear(hidden_size, hidden_size, bias=False, **kw)
        self.down = nn.Linear(hidden_size, hidden_size, bias=False, **kw)

    def forward(self, concept: Tensor):
        x = self.norm(concept)
        v = self.down(F.silu(self.gate(x)) * self.up(x))
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return self.basis(), v, None


class MaskSelect(SubspaceModule):
    def __init__(self, hidden_size: int, k: int, temperature: float = 1.0, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.basis = OrthogonalBasis(hidden_size, k, **kw)
        self.norm = _RMSNorm(hidden_size, **kw)
        self.proj = nn.Linear(hidden_size, k, **kw)
        self.temperature = temperature

    def forward(self, concept: Tensor):
        mask = torch.sigmoid(self.proj(self.norm(concept)) / self.temperature)
        return self.basis(), None, mask


class DAS(SubspaceModule):
    def __init__(self, hidden_size: int, k: int, dtype=None, device=None):
        super().__init__()
        self.basis = OrthogonalBasis(hidden_size, k, dtype=dtype, device=device)

    def forward(self, concept: Tensor):
        return self.basis(), None, None


class BoundlessDAS(SubspaceModule):
    def __init__(self, hidden_size: int, k: int, temperature: float = 1.0, dtype=None, device=None):
        super().__init__()
        self.basis = OrthogonalBasis(hidden_size, hidden_size, dtype=dtype, device=device)
        # The boundary and the index stay in float32, as the basis does: in bf16 the index
        # loses integers above 256 (d = 576: 577 positions on fewer values), and a boundary
        # near 64 moves in steps of 0.5, so an optimizer's small updates were lost.
        self.boundary = nn.Parameter(torch.tensor(float(k), dtype=torch.float32, device=device))
        self.register_buffer("index", torch.arange(hidden_size, dtype=torch.float32, device=device),
                             persistent=False)
        self.temperature = temperature

    def forward(self, concept: Tensor):
        mask = torch.sigmoid((self.boundary - self.index) / self.temperature)
        return self.basis(), None, mask.to(self.basis.out_dtype)


def make_subspace(name: str, hidden_size: int, k: int, dtype=None, device=None) -> SubspaceModule:
    """Build a subspace module by name: reflect, mask, das or boundless."""
    classes = {"reflect": ReflectSelect, "mask": MaskSelect, "das": DAS, "boundless": BoundlessDAS}
    if name not in classes:
        raise ValueError(f"subspace must be one of {SUBSPACES}, got {name!r}")
    if not 1 <= k <= hidden_size:
        raise ValueError(f"feature_dim must be in [1, hidden size {hidden_size}], got {k}")
    return classes[name](hidden_size, k, dtype=dtype, device=device)


__all__ = ["SUBSPACES", "ReflectSelect", "MaskSelect", "DAS", "BoundlessDAS", "OrthogonalBasis", "make_subspace", "SubspaceModule"]
