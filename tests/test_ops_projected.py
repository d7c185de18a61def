"""The projected (few-GEMM) formulation, csrc/common/interchange_projected.h, which the CUDA
backend uses for large soft inputs and for its backward. Registered for every device as
interchange_{fwd,bwd}_projected, so this runs the exact C++ code on the CPU.

Each output and gradient is compared with the float64 reference's autograd; in fp32 / bf16
the error may be at most C times the torch reference's own error in that dtype."""
import pytest
import torch

import hyperdas_fast.ops.library  # noqa: F401  (loads the ops)
from hyperdas_fast.ops.reference import interchange_reference

OPS = torch.ops.hyperdas_fast
NAMES = ("base", "source", "weights", "basis", "reflect", "mask")


def make_inputs(B, T, S, d, k, reflect=True, mask="batch", seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    source = torch.randn(B, S, d, generator=g, dtype=torch.float64)
    weights = torch.softmax(2 * torch.randn(B, S + 1, T, generator=g, dtype=torch.float64), dim=1)
    basis = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]  # column-major
    v = torch.nn.functional.normalize(torch.randn(B, d, generator=g, dtype=torch.float64), dim=-1) if reflect else None
    m = {"batch": lambda: torch.rand(B, k, generator=g, dtype=torch.float64),
         "shared": lambda: torch.rand(k, generator=g, dtype=torch.float64), None: lambda: None}[mask]()
    return [None if a is None else a.to(device) for a in (base, source, weights, basis, v, m)]


def reference_grads(args, grad_out):
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    out = interchange_reference(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [None if a is None else a.grad for a in leaves]


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


CONFIGS = [dict(reflect=True, mask="batch"), dict(reflect=True, mask="shared"), dict(reflect=True, mask=None),
           dict(reflect=False, mask=None), dict(reflect=False, mask="batch")]
IDS = ["reflect-mask_batch", "reflect-mask_shared", "reflect", "plain", "mask_batch"]
SHAPES = [(3, 7, 5, 40, 6), (1, 1, 1, 8, 1), (2, 5, 3, 16, 16), (4, 9, 12, 33, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_float64_matches_reference_autograd(shape, config):
    args = make_inputs(*shape, **config)
    grad_out = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref, ref_grads = reference_grads(args, grad_out)
    out, coords = OPS.interchange_fwd_projected(*args, True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grads = OPS.interchange_bwd_projected(grad_out, *args)
    for name, a, g, r in zip(NAMES, args, grads, ref_grads):
        if a is None:
            assert g.numel() == 0, name
            continue
        assert g.shape == a.shape and g.dtype == a.dtype, name
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-11, msg=name)
    # g_basis comes back in the basis's layout (a QR factor is column-major), the others
    # contiguous: what interchange_bwd's fake kernel promises (the CUDA backward returns these)
    assert grads[3].stride() == args[3].stride()
    for name, g in zip(NAMES, grads):
        assert name == "basis" or g.is_contiguous(), name
    # coords = R_b^T (mix - base), before the mask (what the autograd saves)
    base, source, weights, basis, v, _ = args
    delta = torch.bmm(weights[:, :-1].transpose(1, 2), source) + (weights[:, -1:].transpose(1, 2) - 1) * base
    expected = delta @ basis
    if v is not None:
        expected = expected - 2 * (delta @ v.unsqueeze(-1)) * (v @ basis).unsqueeze(1)
    torch.testing.assert_close(coords, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS[:1] + CONFIGS[3:4], ids=[IDS[0], IDS[3]])
def test_low_precision_error_is_that_of_the_reference(dtype, config):
    """|projected - ref64| <= C |torch(dtype) - ref64| (+ one eps), output and every gradient."""
    args64 = make_inputs(6, 24, 20, 96, 16, **config)
    args = [None if a is None else a.to(dtype) for a in args64]
    args64 = [None if a is None else a.double() for a in args]  # the same rounded inputs
    grad_out = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref, ref_grads = reference_grads(args64, grad_out)
    same, same_grads = reference_grads(args, grad_out)
    out = OPS.interchange_fwd_projected(*args)[0]
    grads = OPS.interchange_bwd_projected(grad_out.to(dtype), *args)
    eps = torch.finfo(dtype).eps
    assert out.dtype == dtype
    assert err(out, ref) <= 4 * err(same, ref) + eps * (1 + ref.abs().max().item())
    for name, a, g, r, s in zip(NAMES, args, grads, ref_grads, same_grads):
        if a is None:
            continue
        assert g.dtype == a.dtype, name
        assert err(g, r) <= 4 * err(s, r) + 4 * eps * (1 + r.abs().max().item()), (name, err(g, r), err(s, r))


def test_noncontiguous_inputs():
    args = make_inputs(3, 6, 4, 20, 5)
    nc = [None if a is None or a.dim() < 2 else a.transpose(-1, -2).contiguous().transpose(-1, -2) for a in args]
    assert not nc[0].is_contiguous()
    grad_out = torch.randn(args[0].shape, dtype=torch.float64)
    torch.testing.assert_close(OPS.interchange_fwd_projected(*nc)[0], OPS.interchange_fwd_projected(*args)[0])
    for a, b in zip(OPS.interchange_bwd_projected(grad_out, *nc), OPS.interchange_bwd_projected(grad_out, *args)):
        torch.testing.assert_close(a, b)


def test_a_non_finite_example_stays_in_its_own_rows():
    """An inf in one example's reflect: the other example's output and gradients stay finite,
    as in the reference (RV's reflection columns met the zeros of the block matrices, and
    0 * inf = NaN spread to every example); the example itself is non-finite."""
    args = make_inputs(2, 3, 4, 40, 5)
    args[4][1, 0] = float("inf")
    out = OPS.interchange_fwd_projected(*args, False)[0]
    assert out[0].isfinite().all() and not out[1].isfinite().all()
    grads = OPS.interchange_bwd_projected(torch.ones_like(args[0]), *args)
    for name, g in zip(NAMES, grads):
        if name in ("base", "source", "weights", "reflect"):
            assert g[0].isfinite().all(), name


def test_batch_too_large_for_k_is_refused():
    # RV = [R | v_1..v_B] would have B extra columns: refused beyond max(64, 2k) examples.
    args = make_inputs(65, 2, 2, 8, 4)
    with pytest.raises(RuntimeError, match="batch 65 is too large for k = 4"):
        OPS.interchange_fwd_projected(*args)


def test_wrong_shapes_are_refused_by_name():
    """The raw projected ops check what interchange_fwd checks: an extra weights row had been
    dropped silently (row S then read as [SELF]), a [1, k] mask broadcast example 0's gate to
    every example, a mask of another dtype was taken, and g_w came back in the wrong shape."""
    base, source, weights, basis, v, m = make_inputs(3, 4, 2, 16, 3)
    bad = {
        "weights must be": (base, source, torch.cat([weights, weights[:, :1]], 1), basis, v, m),
        "mask must be": (base, source, weights, basis, v, m[:1]),
        "mask has dtype": (base, source, weights, basis, v, m.float()),
        "reflect must be": (base, source, weights, basis, v[:1], m),
        "source must be": (base, source[:, :, :-1], weights, basis, v, m),
    }
    for message, args in bad.items():
        with pytest.raises(RuntimeError, match=message):
            OPS.interchange_fwd_projected(*args, False)
        with pytest.raises(RuntimeError, match=message):
            OPS.interchange_bwd_projected(torch.ones_like(base), *args)
    with pytest.raises(RuntimeError, match="grad_out must have base's shape"):
        OPS.interchange_bwd_projected(torch.ones_like(base[:, :-1]), base, source, weights, basis, v, m)


# ------------------------------------------------------------------------------------
# GPU: the CUDA backend's choice between the fused kernels and this formulation
# ------------------------------------------------------------------------------------

needs_cuda_backend = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in __import__("hyperdas_fast").ops.available_backends("cuda"),
    reason="needs a CUDA device and the hyperdas_fast._C_cuda extension")


CUDA_PATHS = ["fused", "projected", "projected_kernels", "projected_apply"]


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 40, 24, 512, 32), (3, 37, 45, 200, 65), (2, 5, 1, 130, 129)])
@pytest.mark.parametrize("config", [dict(reflect=True, mask="batch"), dict(reflect=True, mask="shared"),
                                    dict(reflect=False, mask="batch"), dict(reflect=False, mask=None)])
def test_cuda_paths_agree_with_reference(path, dtype, shape, config, monkeypatch):
    """Every soft path of the cuda backend, forced (HYPERDAS_FAST_CUDA_SOFT). The second shape
    has partial row and source tiles and k past a padding step for the k-space kernels; the
    third has T < 16, S = 1, d = 130 not a multiple of 8 (the apply kernel's scalar loads) and
    k = 129 (padded to 256: the sources kernel's 16-row steps, the apply kernel's large
    shared memory)."""
    from hyperdas_fast import ops

    monkeypatch.setenv("HYPERDAS_FAST_CUDA_SOFT", path)
    args64 = make_inputs(*shape, device="cuda", **config)
    args = [None if a is None else a.to(dtype) for a in args64]
    args64 = [None if a is None else a.double() for a in args]
    grad_out = torch.randn(args[0].shape, device="cuda", dtype=torch.float64)
    ref, ref_grads = reference_grads(args64, grad_out)
    same, same_grads = reference_grads(args, grad_out)
    leaves = [None if a is None else a.clone().requires_grad_() for a in args]
    out = ops.interchange(*leaves, backend="cuda")
    out.backward(grad_out.to(dtype))
    eps = torch.finfo(dtype).eps * (8 if dtype == torch.float32 else 1)
    assert err(out, ref) <= 4 * err(same, ref) + eps * (1 + ref.abs().max().item())
    for name, a, r, s in zip(NAMES, leaves, ref_grads, same_grads):
        if a is None:
            continue
        assert err(a.grad, r) <= 4 * err(s, r) + 4 * eps * (1 + r.abs().max().item()), name


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("path,expected", [
    ("projected_kernels", {"forward_kernel", "backward_rows_kernel", "backward_sources_kernel"}),
    ("projected_apply", {"forward_kernel", "apply_kernel", "backward_rows_kernel", "backward_sources_kernel"}),
])
def test_cuda_kspace_paths_run_their_kernels(path, expected, monkeypatch):
    """The forced kernel paths really launch the k-space kernels (the ATen path would pass the
    accuracy test above too)."""
    from hyperdas_fast import ops

    monkeypatch.setenv("HYPERDAS_FAST_CUDA_SOFT", path)
    leaves = [a.float().requires_grad_() for a in make_inputs(3, 37, 45, 200, 65, device="cuda")]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.interchange(*leaves, backend="cuda").sum().backward()
        torch.cuda.synchronize()
    names = " ".join(e.name for e in prof.events())
    missing = {k for k in expected if f"{k}<" not in names and f"{k}(" not in names}
    assert not missing, f"kernels not launched: {missing}"


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("shape,forward_path", [((3, 37, 45, 200, 65), "fused"), ((4, 128, 8, 8192, 64), "kspace")],
                         ids=["below_2^22", "at_2^22"])
def test_cuda_default_soft_paths(shape, forward_path, monkeypatch):
    """With HYPERDAS_FAST_CUDA_SOFT unset (soft_path() in csrc/cuda/interchange_cuda.cpp): a
    forward without a gradient by the fused kernels below B*T*d = 2^22 and by the k-space
    forward kernel from there; with a gradient (interchange_fwd_train, which makes the
    projections for the backward anyway) by the k-space kernel at every size; the backward
    always by the k-space kernels."""
    from hyperdas_fast import ops

    monkeypatch.delenv("HYPERDAS_FAST_CUDA_SOFT", raising=False)
    args = [a.float() for a in make_inputs(*shape, device="cuda")]

    def kernels(run):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            result = run()
            torch.cuda.synchronize()
        return result, " ".join(e.name for e in prof.events())

    def forward_kernel(names):
        fused, kspace = "coords_kernel<" in names, "kspace::forward_kernel<" in names
        if fused != kspace:
            return "fused" if fused else "kspace"
        return f"neither or both: {names[:2000]}"

    with torch.no_grad():
        _, names = kernels(lambda: ops.interchange(*args, backend="cuda"))
    assert forward_kernel(names) == forward_path
    leaves = [a.requires_grad_() for a in args]
    out, names = kernels(lambda: ops.interchange(*leaves, backend="cuda"))
    assert forward_kernel(names) == "kspace"
    _, names = kernels(lambda: out.sum().backward())
    assert "backward_rows_kernel<" in names and "backward_sources_kernel<" in names


@pytest.mark.gpu
@needs_cuda_backend
def test_cuda_soft_path_override_is_checked(monkeypatch):
    from hyperdas_fast import ops

    monkeypatch.setenv("HYPERDAS_FAST_CUDA_SOFT", "fastest")
    args = [a.float() for a in make_inputs(2, 3, 4, 16, 4, device="cuda")]
    with pytest.raises(RuntimeError, match="HYPERDAS_FAST_CUDA_SOFT must be"):
        ops.interchange(*args, backend="cuda")


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 37, 45, 200, 65), (4, 128, 8, 8192, 64)], ids=["fused_forward", "kspace_forward"])
@pytest.mark.parametrize("config", [dict(reflect=True, mask="batch"), dict(reflect=False, mask="shared")],
                         ids=["reflect-mask_batch", "plain-mask_shared"])
def test_cuda_training_forward_keeps_projections(dtype, shape, config, monkeypatch):
    """interchange_fwd_train on CUDA (the forward the autograd runs when a gradient is needed,
    by default paths): the plain forward's output (up to rounding: it always takes the k-space
    forward kernel), and [P_S; P_B (; RV)] kept for the
    backward, which from them gives the gradients of the backward that recomputes them."""
    monkeypatch.delenv("HYPERDAS_FAST_CUDA_SOFT", raising=False)
    B, T, S, d, k = shape
    args = [None if a is None else a.to(dtype) for a in make_inputs(*shape, device="cuda", **config)]
    base, source, _, basis, v, _ = args
    out, coords, kept = OPS.interchange_fwd_train(*args)
    plain = OPS.interchange_fwd(*args)[0]  # (below 2^22 by the fused kernel, this by the k-space one)
    assert err(out, plain) <= (2e-2 if dtype == torch.bfloat16 else 1e-4) * (1 + plain.abs().max().item())
    assert coords.numel() == 0
    rv = basis if v is None else torch.cat([basis, -2 * v.t()], 1)
    assert kept.shape == (B * S + B * T + (d if v is not None else 0), rv.shape[1]) and kept.dtype == dtype
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kept[:B * S], source.reshape(-1, d) @ rv, **tol)
    torch.testing.assert_close(kept[B * S:B * S + B * T], base.reshape(-1, d) @ rv, **tol)
    if v is not None:
        torch.testing.assert_close(kept[B * S + B * T:], rv, rtol=0, atol=0)
    grad = torch.randn_like(base)
    for name, a, r in zip(NAMES, OPS.interchange_bwd(grad, *args, None, kept), OPS.interchange_bwd(grad, *args)):
        assert a.shape == r.shape, name
        if r.numel():  # (an empty gradient stands for a None input)
            assert err(a, r) <= (2e-2 if dtype == torch.bfloat16 else 1e-5) * (1 + r.abs().max().item()), name
    if dtype == torch.float32:  # fake kernels, schemas and the autograd registration on CUDA tensors
        utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
        torch.library.opcheck(OPS.interchange_fwd_train, tuple(args), test_utils=utils)
        torch.library.opcheck(OPS.interchange_bwd, (grad, *args, None, kept), test_utils=utils)


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("force,keeps", [("", True), ("projected_kernels", True), ("fused", False),
                                         ("projected", False)])
def test_cuda_autograd_saves_projections(force, keeps, monkeypatch):
    """The C++ autograd saves the training forward's projections where the backward runs the
    k-space kernels (not under the fused or ATen projected paths, nor for k > 256)."""
    from hyperdas_fast import ops

    monkeypatch.setenv("HYPERDAS_FAST_CUDA_SOFT", force)
    B, T, S, d, k = 3, 37, 45, 200, 65
    leaves = [a.float().requires_grad_() for a in make_inputs(B, T, S, d, k, device="cuda")]
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ops.interchange(*leaves, backend="cuda")
    assert ((B * S + B * T + d, k + B) in shapes) == keeps, shapes
    out.sum().backward()
    assert all(a.grad is not None for a in leaves)

