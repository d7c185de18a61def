"""The torch reference against the formula written out loop by loop, the paper formulation,
the hard forms, gradcheck in float64, and the input guard's errors."""
import pytest
import torch

from hyperdas_fast import ops
from hyperdas_fast.ops.reference import interchange_paper, interchange_reference


def make_inputs(B=2, T=3, S=4, d=7, k=3, reflect=True, mask="batch", dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, T, d, generator=g, dtype=dtype)
    source = torch.randn(B, S, d, generator=g, dtype=dtype)
    weights = torch.softmax(torch.randn(B, S + 1, T, generator=g, dtype=dtype), dim=1)
    basis = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=dtype))[0]
    v = torch.nn.functional.normalize(torch.randn(B, d, generator=g, dtype=dtype), dim=-1) if reflect else None
    if mask == "batch":
        m = torch.rand(B, k, generator=g, dtype=dtype)
    elif mask == "shared":
        m = torch.rand(k, generator=g, dtype=dtype)
    else:
        m = None
    return base, source, weights, basis, v, m


def loop_reference(base, source, weights, basis, reflect, mask):
    """The formula of HYPERDAS.md section 1, one token at a time, with R_b built densely."""
    B, T, d = base.shape
    S = source.shape[1]
    out = torch.empty_like(base)
    for b in range(B):
        if basis is not None:
            R = basis
            if reflect is not None:
                R = (torch.eye(d, dtype=base.dtype) - 2 * torch.outer(reflect[b], reflect[b])) @ basis
            m = torch.ones(basis.shape[1], dtype=base.dtype) if mask is None else (mask[b] if mask.dim() == 2 else mask)
            P = R @ torch.diag(m) @ R.t()
        for t in range(T):
            mix = sum(weights[b, s, t] * source[b, s] for s in range(S)) + weights[b, S, t] * base[b, t]
            out[b, t] = mix if basis is None else base[b, t] + P @ (mix - base[b, t])
    return out


@pytest.mark.parametrize("reflect", [True, False])
@pytest.mark.parametrize("mask", ["batch", "shared", None])
@pytest.mark.parametrize("shape", [(2, 3, 4, 7, 3), (1, 1, 1, 5, 1), (3, 5, 2, 6, 6)])
def test_reference_matches_loop_and_paper(reflect, mask, shape):
    B, T, S, d, k = shape
    args = make_inputs(B, T, S, d, k, reflect, mask)
    expected = loop_reference(*args)
    torch.testing.assert_close(interchange_reference(*args), expected)
    torch.testing.assert_close(interchange_paper(*args), expected)
    torch.testing.assert_close(ops.interchange(*args, backend="torch"), expected)


def test_vanilla_interchange_is_the_mix():
    base, source, weights, _, _, _ = make_inputs()
    out = ops.interchange(base, source, weights)
    torch.testing.assert_close(out, loop_reference(base, source, weights, None, None, None))


def test_one_hot_source_with_full_basis_copies_source():
    base, source, _, _, _, _ = make_inputs(B=1, T=2, S=2, d=5, k=5, reflect=False, mask=None)
    weights = torch.zeros(1, 3, 2, dtype=base.dtype)
    weights[0, 1, 0] = 1.0  # token 0 takes source 1
    weights[0, 2, 1] = 1.0  # token 1 keeps itself
    basis = torch.eye(5, dtype=base.dtype)
    out = ops.interchange(base, source, weights, basis)
    torch.testing.assert_close(out[0, 0], source[0, 1])
    torch.testing.assert_close(out[0, 1], base[0, 1])


@pytest.mark.parametrize("reflect", [True, False])
@pytest.mark.parametrize("mask", ["batch", None])
def test_gradcheck_reference(reflect, mask):
    args = [a.requires_grad_() if a is not None else None for a in make_inputs(2, 3, 2, 5, 2, reflect, mask)]
    assert torch.autograd.gradcheck(lambda *a: interchange_reference(*a), tuple(args))


@pytest.mark.parametrize("reflect", [True, False])
def test_hard_forms_match_one_hot_soft(reflect):
    base, source, _, basis, v, m = make_inputs(B=3, T=5, S=4, d=8, k=3, reflect=reflect)
    index = torch.tensor([[0, -1, 3, 2, -1], [-1, -1, -1, -1, -1], [1, 1, 0, -1, 3]])
    weights = torch.zeros(3, 5, 5, dtype=base.dtype)
    for b in range(3):
        for t in range(5):
            weights[b, index[b, t] if index[b, t] >= 0 else 4, t] = 1.0
    expected = ops.interchange(base, source, weights, basis, v, m, backend="torch")
    torch.testing.assert_close(ops.interchange_hard(base, source, index, basis, v, m, backend="torch"), expected)
    torch.testing.assert_close(ops.weights_to_source_index(weights), index)
    inplace = base.clone()
    returned = ops.interchange_hard(inplace, source, index, basis, v, m, inplace=True, backend="torch")
    assert returned.data_ptr() == inplace.data_ptr()
    torch.testing.assert_close(inplace, expected)
    triples = torch.nonzero(index >= 0)
    triples = torch.cat([triples, index[index >= 0].unsqueeze(1)], dim=1)
    torch.testing.assert_close(ops.interchange_triples(base, source, triples, basis, v, m), expected)


def test_hard_form_gradients_flow():
    base, source, _, basis, v, m = make_inputs(B=2, T=3, S=2, d=5, k=2)
    source.requires_grad_()
    basis.requires_grad_()
    index = torch.tensor([[1, -1, 0], [-1, 0, -1]])
    ops.interchange_hard(base, source, index, basis, v, m).sum().backward()
    assert source.grad.abs().sum() > 0 and basis.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(weights=a["weights"][:, :-1]), "weights must be \\[B, S\\+1, T\\]"),
        (lambda a: a.update(basis=torch.randn(6, 3, dtype=torch.float64)), "basis must be \\[d, k\\]"),
        (lambda a: a.update(basis=torch.randn(7, 9, dtype=torch.float64)), "k <= d"),
        (lambda a: a.update(reflect=a["reflect"][:1]), "reflect must be \\[B, d\\]"),
        (lambda a: a.update(mask=torch.ones(5, dtype=torch.float64)), "mask must be"),
        (lambda a: a.update(source=a["source"].float()), "source has dtype"),
        (lambda a: a.update(base=a["base"][:0], source=a["source"][:0], weights=a["weights"][:0]), "empty batch"),
        (lambda a: a.update(source=a["source"][:, :, :3]), "source must be \\[B, S, d\\]"),
        (lambda a: a.update(base=a["base"].long()), "floating"),
        (lambda a: a.update(basis=None), "need a basis"),
    ],
)
def test_bad_input_names_argument(mutate, message):
    base, source, weights, basis, v, m = make_inputs()
    args = dict(base=base, source=source, weights=weights, basis=basis, reflect=v, mask=m)
    mutate(args)
    with pytest.raises(ValueError, match=message):
        ops.interchange(**args)


def test_bad_hard_input():
    base, source, _, basis, _, _ = make_inputs(B=2, T=3, S=4)
    with pytest.raises(ValueError, match="source_index values must lie in \\[-1, 3\\]"):
        ops.interchange_hard(base, source, torch.tensor([[0, 4, -1], [0, 0, 0]]), basis)
    with pytest.raises(ValueError, match="source_index must be \\[B, T\\]"):
        ops.interchange_hard(base, source, torch.zeros(2, 2, dtype=torch.long), basis)
    with pytest.raises(ValueError, match="base_pos has values"):
        ops.interchange_triples(base, source, torch.tensor([[0, 3, 0]]), basis)
    with pytest.raises(ValueError, match="unique"):
        ops.interchange_triples(base, source, torch.tensor([[0, 1, 0], [0, 1, 2]]), basis)
    # not truncated to integers, nor moved to base's device, silently
    for bad in (torch.tensor([[0.0, 1.7, 0.2]]), torch.tensor([[False, True, False]])):
        with pytest.raises(ValueError, match=f"triples must be an integer tensor .*got {bad.dtype}"):
            ops.interchange_triples(base, source, bad, basis)
    with pytest.raises(ValueError, match="triples is on meta but base is on cpu"):
        ops.interchange_triples(base, source, torch.zeros(1, 3, dtype=torch.long, device="meta"), basis)
    with pytest.raises(ValueError, match="contiguous"):
        ops.interchange_hard(base.transpose(0, 1).contiguous().transpose(0, 1), source,
                             torch.zeros(2, 3, dtype=torch.long), basis, inplace=True)
    with pytest.raises(ValueError, match="backend"):
        ops.interchange(base, source, torch.ones(2, 5, 3, dtype=base.dtype), backend="nope")
