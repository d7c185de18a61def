"""The C++ CPU backend (``backend="cpp"``) against the float64 torch reference.

Forward and all six gradients over odd shapes and every optional-argument combination;
fp32 must be as accurate as the fp32 torch reference (flash-attention style:
max|cpp - ref64| <= C * max|torch32 - ref64| + atol), fp64 must match to round-off, bf16
and fp16 (computed in fp32) at least as well as torch in that dtype. Plus gradcheck
through ``ops.interchange(backend="cpp")`` and the in-place hard-rows kernel.
"""
import pytest
import torch

from hyperdas_fast import ops
from hyperdas_fast.ops import cpu  # fails the module when the extension is not built
from hyperdas_fast.ops.reference import interchange_reference, interchange_rows_reference

NAMES = ("base", "source", "weights", "basis", "reflect", "mask")

# (B, T, S, d, k): d not a multiple of 8/16, T = 1, S = 1, k = 1, k = d, B = 1,
# T not a multiple of the 8-row reduction tile, and the SmolLM2 training shape.
SHAPES = [
    (2, 3, 4, 7, 3),
    (1, 1, 1, 5, 1),
    (3, 5, 2, 13, 13),
    (2, 17, 9, 37, 5),
    (16, 24, 24, 576, 64),
]
# (use_basis, reflect, mask)
VARIANTS = [
    (True, True, "batch"),
    (True, True, "shared"),
    (True, True, None),
    (True, False, "batch"),
    (True, False, "shared"),
    (True, False, None),
    (False, False, None),
]


def _variant_id(v):
    use_basis, reflect, mask = v
    if not use_basis:
        return "vanilla"
    return f"{'reflect' if reflect else 'noreflect'}-mask_{mask}"


def make_inputs(B, T, S, d, k, use_basis=True, reflect=True, mask="batch", weights_kind="soft", seed=0):
    """float64 inputs; weights 'soft' (softmax), 'onehot' (every column one-hot, some on
    [SELF]) or 'zerocol' (some columns all zero, some source rows never used)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    base = torch.randn(B, T, d, generator=g, dtype=f64)
    source = torch.randn(B, S, d, generator=g, dtype=f64)
    if weights_kind == "soft":
        weights = torch.softmax(2 * torch.randn(B, S + 1, T, generator=g, dtype=f64), dim=1)
    elif weights_kind == "onehot":
        index = torch.randint(0, S + 1, (B, T), generator=g)
        weights = torch.nn.functional.one_hot(index, S + 1).transpose(1, 2).to(f64)
    elif weights_kind == "zerocol":
        weights = torch.softmax(torch.randn(B, S + 1, T, generator=g, dtype=f64), dim=1)
        weights[:, :, ::2] = 0.0
        weights[:, 0, :] = 0.0
    else:
        raise AssertionError(weights_kind)
    basis = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=f64))[0] if use_basis else None
    v = None
    if use_basis and reflect:
        v = torch.nn.functional.normalize(torch.randn(B, d, generator=g, dtype=f64), dim=-1)
    m = None
    if use_basis and mask == "batch":
        m = torch.rand(B, k, generator=g, dtype=f64)
    elif use_basis and mask == "shared":
        m = torch.rand(k, generator=g, dtype=f64)
    return [base, source, weights, basis, v, m]


def non_contiguous(t):
    """Same values, reversed-dimension storage (strides not row-major)."""
    if t is None or t.dim() < 2:
        return t
    dims = list(range(t.dim()))[::-1]
    out = t.permute(*dims).contiguous().permute(*dims)
    assert not out.is_contiguous()
    return out


def forward_and_grads(fn, args, grad_out):
    """(out, [grads of the non-None args]) with autograd; args are leaf copies."""
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    out = fn(*leaves)
    present = [a for a in leaves if a is not None]
    grads = torch.autograd.grad(out, present, grad_out.to(out.dtype))
    return out.detach(), list(grads)


def cpp_fn(*a):
    return ops.interchange(*a, backend="cpp")


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_like_torch(args64, dtype, grad64, *, contiguous=True, factor=2.0, atol=None):
    """cpp in ``dtype`` vs torch in ``dtype``, both against the float64 reference."""
    args = [None if a is None else a.to(dtype) for a in args64]
    if not contiguous:
        args = [non_contiguous(a) for a in args]
    ref_out, ref_grads = forward_and_grads(interchange_reference, args64, grad64)
    t_out, t_grads = forward_and_grads(interchange_reference, args, grad64)
    c_out, c_grads = forward_and_grads(cpp_fn, args, grad64)
    assert c_out.dtype == dtype and c_out.shape == ref_out.shape
    eps = torch.finfo(dtype).eps
    names = ["out"] + [n for n, a in zip(NAMES, args64) if a is not None]
    for name, c, t, r in zip(names, [c_out] + c_grads, [t_out] + t_grads, [ref_out] + ref_grads):
        assert c.shape == r.shape and c.dtype == dtype, name
        scale = max(r.abs().max().item(), 1.0)
        tol = factor * max_err(t, r) + (atol if atol is not None else 4 * eps) * scale
        err = max_err(c, r)
        assert err <= tol, f"{name}: max|cpp - ref64| = {err:.3e} > {tol:.3e} (torch {dtype}: {max_err(t, r):.3e})"


def assert_fp64_matches_reference(args):
    """cpp's output and gradients through autograd equal the float64 reference to round-off;
    returns (grad_out, reference gradients)."""
    grad = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_out, ref_grads = forward_and_grads(interchange_reference, args, grad)
    c_out, c_grads = forward_and_grads(cpp_fn, args, grad)
    torch.testing.assert_close(c_out, ref_out, rtol=1e-12, atol=1e-12)
    for c, r in zip(c_grads, ref_grads):
        torch.testing.assert_close(c, r, rtol=1e-11, atol=1e-11)
    return grad, ref_grads


FP32_CASES = [(shape, variant) for shape in SHAPES[:-1] for variant in VARIANTS] + [
    (SHAPES[-1], variant) for variant in (VARIANTS[0], VARIANTS[4], VARIANTS[6])
]


@pytest.mark.parametrize(
    "shape,variant", FP32_CASES, ids=["B{}_T{}_S{}_d{}_k{}-".format(*s) + _variant_id(v) for s, v in FP32_CASES]
)
def test_fp32_forward_and_grads_match_reference(shape, variant):
    args64 = make_inputs(*shape, *variant)
    grad64 = torch.randn(args64[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_like_torch(args64, torch.float32, grad64)


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "B{}_T{}_S{}_d{}_k{}".format(*s))
def test_fp64_matches_reference_to_roundoff(shape, variant):
    assert_fp64_matches_reference(make_inputs(*shape, *variant))


@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[6]], ids=_variant_id)
def test_fp64_fewer_examples_than_threads(variant):
    """The backward's source-side products run per example when there is at least one
    example per thread, and as batched GEMMs otherwise: check the batched path too."""
    args = make_inputs(2, 5, 3, 11, 4, *variant)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        assert torch.get_num_threads() > args[0].shape[0]
        assert_fp64_matches_reference(args)
    finally:
        torch.set_num_threads(threads)


def _basis_in_layout(basis, layout):
    """The same [d, k] values stored row-major, column-major (a QR factor) or as a strided view."""
    if layout == "row":
        return basis.contiguous()
    if layout == "col":
        return basis.t().contiguous().t()
    wide = torch.zeros(basis.shape[0], 2 * basis.shape[1], dtype=basis.dtype)
    wide[:, ::2] = basis
    return wide[:, ::2]


@pytest.mark.parametrize("layout", ["row", "col", "strided"])
@pytest.mark.parametrize("variant", VARIANTS[:6], ids=_variant_id)
@pytest.mark.parametrize("path", ["per_example", "batched"])
def test_fp64_both_cpu_paths(path, variant, layout, monkeypatch):
    """The soft kernels run one example per task (examples >= threads) or as batched GEMMs
    over all rows; HYPERDAS_FAST_CPU_SOFT forces either. Both, through autograd (the
    backward reuses the forward's coords and delta) and through interchange_bwd without
    them (recomputed), in every basis layout."""
    monkeypatch.setenv("HYPERDAS_FAST_CPU_SOFT", path)
    args = make_inputs(5, 7, 4, 19, 6, *variant)
    args[3] = _basis_in_layout(args[3], layout)
    grad, ref_grads = assert_fp64_matches_reference(args)
    raw = torch.ops.hyperdas_fast.interchange_bwd(grad, *args, None, None)
    present = [g for g, a in zip(raw, args) if a is not None]
    for c, r in zip(present, ref_grads):
        torch.testing.assert_close(c, r, rtol=1e-11, atol=1e-11)
    assert raw[3].stride() == args[3].stride() or layout == "strided"


@pytest.mark.parametrize("layout", ["row", "col"])
def test_fp64_per_example_sums_three_chunks_in_order(layout, monkeypatch):
    """With three threads the per-example backward keeps three g_basis partials (chunks of
    2, 2 and 1 examples) and sums them in chunk order into a basis-layout gradient; two
    threads, the common case, would leave the third-and-later partials unchecked."""
    monkeypatch.setenv("HYPERDAS_FAST_CPU_SOFT", "per_example")
    args = make_inputs(5, 7, 4, 19, 6, *VARIANTS[0])
    args[3] = _basis_in_layout(args[3], layout)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert torch.get_num_threads() == 3
        assert_fp64_matches_reference(args)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("threads, batches, forced", [(5, (10, 8), False), (3, (6, 4), True), (4, (6,), True)])
def test_fp64_per_example_with_fewer_chunks_than_threads(threads, batches, forced, monkeypatch):
    """B = 8 on 5 threads splits into 4 chunks of 2 examples (the per-example path is the
    automatic choice there), B = 4 on 3 threads into 2 of 2, B = 6 on 4 threads into 3 of 2
    (forced): no thread's chunk may be empty. (One was: its slice of the g_basis partials
    was summed unwritten, so basis.grad took whatever the scratch buffer held, here the
    previous call's partials.) The first, larger batch fills the scratch."""
    if forced:
        monkeypatch.setenv("HYPERDAS_FAST_CPU_SOFT", "per_example")
    else:
        monkeypatch.delenv("HYPERDAS_FAST_CPU_SOFT", raising=False)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.get_num_threads() == threads
        for B in batches:
            assert_fp64_matches_reference(make_inputs(B, 4, 3, 16, 4, *VARIANTS[0]))
    finally:
        torch.set_num_threads(saved)


def test_cpu_path_override_rejects_unknown_value(monkeypatch):
    monkeypatch.setenv("HYPERDAS_FAST_CPU_SOFT", "fastest")
    args = make_inputs(2, 3, 2, 5, 2)
    with pytest.raises(RuntimeError, match="HYPERDAS_FAST_CPU_SOFT must be"):
        ops.interchange(*args, backend="cpp")


@pytest.mark.parametrize("weights_kind", ["onehot", "zerocol"])
@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[4], VARIANTS[6]], ids=_variant_id)
def test_degenerate_weights(weights_kind, variant):
    args64 = make_inputs(3, 6, 4, 21, 4, *variant, weights_kind=weights_kind)
    grad64 = torch.randn(args64[0].shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert_like_torch(args64, torch.float32, grad64)


@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[4], VARIANTS[6]], ids=_variant_id)
@pytest.mark.parametrize("shape", [(2, 5, 3, 19, 4), (3, 9, 9, 40, 40)], ids=lambda s: "B{}_T{}_S{}_d{}_k{}".format(*s))
def test_non_contiguous_inputs(shape, variant):
    args64 = make_inputs(*shape, *variant)
    grad64 = non_contiguous(torch.randn(args64[0].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    assert_like_torch(args64, torch.float32, grad64, contiguous=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[4], VARIANTS[6]], ids=_variant_id)
@pytest.mark.parametrize("shape", [(2, 3, 4, 7, 3), (2, 17, 9, 37, 5), (4, 12, 10, 96, 16)], ids=lambda s: "B{}_T{}_S{}_d{}_k{}".format(*s))
def test_reduced_precision(shape, variant, dtype):
    # fp32 accumulation: at least as accurate as torch running in bf16/fp16
    # (atol: one rounding of the output, which both pay).
    args64 = make_inputs(*shape, *variant)
    grad64 = torch.randn(args64[0].shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert_like_torch(args64, dtype, grad64, factor=1.0, atol=2 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[1], VARIANTS[5], VARIANTS[6]], ids=_variant_id)
def test_gradcheck_cpp(variant):
    args = make_inputs(2, 3, 2, 4, 2, *variant, seed=5)
    args = tuple(None if a is None else a.requires_grad_() for a in args)
    assert torch.autograd.gradcheck(cpp_fn, args)


def test_gradcheck_cpp_single_token():
    args = make_inputs(1, 1, 1, 4, 1, True, True, "shared", seed=6)
    args = tuple(None if a is None else a.requires_grad_() for a in args)
    assert torch.autograd.gradcheck(cpp_fn, args)


def test_only_some_inputs_require_grad():
    base, source, weights, basis, v, m = make_inputs(2, 4, 3, 11, 3)
    basis.requires_grad_()
    out = ops.interchange(base, source, weights, basis, v, m, backend="cpp")
    (g_basis,) = torch.autograd.grad(out.square().sum(), [basis])
    basis_ref = basis.detach().clone().requires_grad_()
    ref = interchange_reference(base, source, weights, basis_ref, v, m)
    ref.square().sum().backward()
    torch.testing.assert_close(g_basis, basis_ref.grad)


def test_no_grad_forward_and_output_layout():
    args = [non_contiguous(a) for a in make_inputs(2, 4, 3, 11, 3)]
    with torch.no_grad():
        out = ops.interchange(*args, backend="cpp")
    assert out.is_contiguous() and not out.requires_grad
    torch.testing.assert_close(out, interchange_reference(*args))


# ------------------------------------------------------------------------------------
# hard rows
# ------------------------------------------------------------------------------------
def make_rows(B, T, S, P, seed=0, index_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(B * T, generator=g)[:P]
    batch_index = (flat // T).to(index_dtype)
    base_pos = (flat % T).to(index_dtype)
    source_pos = torch.randint(0, S, (P,), generator=g).to(index_dtype)
    return batch_index, base_pos, source_pos


ROWS_CASES = [
    (shape_p, variant, dtype)
    for shape_p in [(2, 3, 4, 7, 3, 4), (1, 1, 1, 5, 1, 1), (3, 9, 5, 37, 37, 20)]
    for variant in VARIANTS
    for dtype in (torch.float64, torch.float32)
] + [((16, 24, 24, 576, 64, 50), variant, torch.float32) for variant in (VARIANTS[0], VARIANTS[4], VARIANTS[6])]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(
    "shape_p,variant,dtype",
    ROWS_CASES,
    ids=["B{}_T{}_S{}_d{}_k{}_P{}-".format(*s) + _variant_id(v) + "-" + str(dt)[6:] for s, v, dt in ROWS_CASES],
)
def test_rows_match_reference(shape_p, variant, inplace, dtype):
    *shape, P = shape_p
    B, T, S, d, k = shape
    args64 = make_inputs(*shape, *variant)
    base, source, _, basis, v, m = [None if a is None else a.to(dtype) for a in args64]
    bi, ti, si = make_rows(B, T, S, P)
    expected64 = interchange_rows_reference(args64[0], args64[1], bi, ti, si, args64[3], args64[4], args64[5])
    expected = interchange_rows_reference(base, source, bi, ti, si, basis, v, m)
    triples = torch.stack([bi, ti, si], dim=1)
    base_in = base.clone()
    out = ops.interchange_triples(base_in, source, triples, basis, v, m, inplace=inplace, backend="cpp")
    if inplace:
        assert out.data_ptr() == base_in.data_ptr()
    else:
        torch.testing.assert_close(base_in, base, rtol=0, atol=0)  # input untouched
    assert out.dtype == dtype and out.shape == base.shape
    eps = torch.finfo(dtype).eps
    tol = 2 * max_err(expected, expected64) + 8 * eps * max(expected64.abs().max().item(), 1.0)
    assert max_err(out, expected64) <= tol
    # rows not named keep their base value bit for bit
    untouched = torch.ones(B, T, dtype=torch.bool)
    untouched[bi, ti] = False
    assert torch.equal(out[untouched], base[untouched])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rows_reduced_precision(dtype):
    args64 = make_inputs(3, 8, 5, 40, 6)
    bi, ti, si = make_rows(3, 8, 5, 10, index_dtype=torch.int32)
    expected64 = interchange_rows_reference(args64[0], args64[1], bi.long(), ti.long(), si.long(), *args64[3:])
    base, source, _, basis, v, m = [a.to(dtype) for a in args64]
    expected = interchange_rows_reference(base, source, bi.long(), ti.long(), si.long(), basis, v, m)
    out = cpu.interchange_rows(base, source, bi, ti, si, basis, v, m, inplace=False)
    assert out.dtype == dtype
    assert max_err(out, expected64) <= max_err(expected, expected64) + 2 * torch.finfo(dtype).eps * expected64.abs().max().item()


def test_rows_empty_and_hard_keep():
    args = make_inputs(2, 4, 3, 9, 2)
    base, source, _, basis, v, m = args
    source_index = torch.full((2, 4), ops.KEEP, dtype=torch.int64)
    out = ops.interchange_hard(base, source, source_index, basis, v, m, backend="cpp")
    assert torch.equal(out, base)
    source_index[0, 1] = 2
    source_index[1, 3] = 0
    out = ops.interchange_hard(base, source, source_index, basis, v, m, backend="cpp")
    expected = ops.interchange_hard(base, source, source_index, basis, v, m, backend="torch")
    torch.testing.assert_close(out, expected)


def test_hard_rows_equal_one_hot_soft():
    # with one-hot weights the soft op and the hard rows agree
    args = make_inputs(3, 7, 5, 33, 4, weights_kind="onehot")
    base, source, weights, basis, v, m = args
    soft = ops.interchange(*args, backend="cpp")
    hard = ops.interchange_hard(base, source, ops.weights_to_source_index(weights), basis, v, m, backend="cpp")
    torch.testing.assert_close(hard, soft, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------
# the C++ side's own checks
# ------------------------------------------------------------------------------------
def test_cpp_kernels_reject_bad_shapes():
    base, source, weights, basis, v, m = make_inputs(2, 3, 4, 7, 3)
    fwd = torch.ops.hyperdas_fast.interchange_fwd
    with pytest.raises(RuntimeError, match="weights must be"):
        fwd(base, source, weights[:, :-1], basis, v, m)
    with pytest.raises(RuntimeError, match="mask must be"):
        fwd(base, source, weights, basis, v, m[:, :-1])
    with pytest.raises(RuntimeError, match="dtype"):
        fwd(base, source.float(), weights, basis, v, m)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.hyperdas_fast.interchange_rows_(
            non_contiguous(base), source, *make_rows(2, 3, 4, 1), basis, v, m
        )


def test_cpp_rows_op_refuses_a_repeated_base_row():
    """The raw in-place rows op adds each row's change to base: a (batch, base_pos) given twice
    had both changes applied on top of each other (neither source's patch). The Python API
    refuses duplicates before it gets here; the op now refuses them too, naming both rows."""
    base, source, weights, basis, v, m = make_inputs(2, 3, 4, 7, 3)
    before = base.clone()
    rows = torch.tensor([1, 0, 1]), torch.tensor([2, 0, 2]), torch.tensor([0, 1, 3])
    with pytest.raises(RuntimeError, match=r"rows 0 and 2 both target base row \(1, 2\)"):
        torch.ops.hyperdas_fast.interchange_rows_(base, source, *rows, basis, v, m)
    assert torch.equal(base, before)  # checked before anything is written
