"""torch.library registration of the hyperdas_fast ops: opcheck (schema, fake kernels,
autograd registration, AOT dispatch), torch.compile(fullgraph=True) with backward, and
the dispatcher's choice of the C++ backend on CPU."""
import pytest
import torch

from hyperdas_fast import ops
from hyperdas_fast.ops import cpu, library
from hyperdas_fast.ops.reference import interchange_reference

OPS = torch.ops.hyperdas_fast
TEST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def make_inputs(B=2, T=3, S=4, d=9, k=3, reflect=True, mask="batch", use_basis=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, T, d, generator=g, dtype=dtype)
    source = torch.randn(B, S, d, generator=g, dtype=dtype)
    weights = torch.softmax(torch.randn(B, S + 1, T, generator=g, dtype=dtype), dim=1)
    basis = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=dtype))[0] if use_basis else None
    v = None
    if use_basis and reflect:
        v = torch.nn.functional.normalize(torch.randn(B, d, generator=g, dtype=dtype), dim=-1)
    m = None
    if use_basis and mask == "batch":
        m = torch.rand(B, k, generator=g, dtype=dtype)
    elif use_basis and mask == "shared":
        m = torch.rand(k, generator=g, dtype=dtype)
    return [base, source, weights, basis, v, m]


CONFIGS = [
    dict(reflect=True, mask="batch"),
    dict(reflect=True, mask="shared"),
    dict(reflect=False, mask=None),
    dict(use_basis=False),
]
CONFIG_IDS = ["reflect-mask_batch", "reflect-mask_shared", "plain_basis", "vanilla"]


@pytest.mark.parametrize("with_coords", [True, False])
@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_opcheck_interchange_fwd(config, requires_grad, with_coords):
    args = make_inputs(**config)
    if requires_grad:
        args = [None if a is None else a.requires_grad_() for a in args]
    torch.library.opcheck(OPS.interchange_fwd, (*args, with_coords), test_utils=TEST_UTILS)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_fwd_coords(config):
    # coords = R_b^T (mix - base) before the mask with a basis and with_coords; else empty
    args = make_inputs(**config)
    out, coords = OPS.interchange_fwd(*args, True)
    out_plain, empty = OPS.interchange_fwd(*args)
    torch.testing.assert_close(out, interchange_reference(*args))
    torch.testing.assert_close(out_plain, out, rtol=0, atol=0)
    assert empty.numel() == 0
    base, source, weights, basis, v, _ = args
    if basis is None:
        assert coords.numel() == 0
        return
    delta = torch.bmm(weights[:, :-1].transpose(1, 2), source) + (weights[:, -1:].transpose(1, 2) - 1) * base
    expected = delta @ basis
    if v is not None:
        expected = expected - 2 * (delta @ v.unsqueeze(-1)) * (v @ basis).unsqueeze(1)
    torch.testing.assert_close(coords, expected)


@pytest.mark.parametrize("use_coords", [True, False])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_opcheck_interchange_bwd(config, use_coords):
    args = make_inputs(**config)
    grad = torch.randn_like(args[0])
    coords = OPS.interchange_fwd(*args, True)[1] if use_coords else None
    torch.library.opcheck(OPS.interchange_bwd, (grad, *args, coords), test_utils=TEST_UTILS)
    # None inputs get empty gradients; present ones get their input's shape
    grads = OPS.interchange_bwd(grad, *args, coords)
    for g, a in zip(grads, args):
        assert g.shape == (a.shape if a is not None else (0,))
    # the forward's coords give the same gradients as recomputing them
    for g, r in zip(grads, OPS.interchange_bwd(grad, *args)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


BASIS_CONFIGS, BASIS_IDS = CONFIGS[:3], CONFIG_IDS[:3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", BASIS_CONFIGS, ids=BASIS_IDS)
def test_opcheck_interchange_fwd_train(config, dtype):
    args = [None if a is None else a.to(dtype) for a in make_inputs(**config)]
    torch.library.opcheck(OPS.interchange_fwd_train, tuple(args), test_utils=TEST_UTILS)
    out, coords, delta = OPS.interchange_fwd_train(*args)
    plain, plain_coords = OPS.interchange_fwd(*args, True)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    if dtype == torch.bfloat16:  # the backward recomputes in float
        assert coords.numel() == 0 and delta.numel() == 0
        return
    torch.testing.assert_close(coords, plain_coords, rtol=0, atol=0)
    base, source, weights = args[:3]
    expected = torch.bmm(weights[:, :-1].transpose(1, 2), source) + (weights[:, -1:].transpose(1, 2) - 1) * base
    torch.testing.assert_close(delta, expected)


@pytest.mark.parametrize("config", BASIS_CONFIGS, ids=BASIS_IDS)
def test_opcheck_interchange_bwd_with_delta(config):
    args = make_inputs(**config)
    grad = torch.randn_like(args[0])
    _, coords, delta = OPS.interchange_fwd_train(*args)
    torch.library.opcheck(OPS.interchange_bwd, (grad, *args, coords, delta), test_utils=TEST_UTILS)
    # the forward's delta gives the same gradients as recomputing the mix
    for g, r in zip(OPS.interchange_bwd(grad, *args, coords, delta), OPS.interchange_bwd(grad, *args)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="delta must have"):
        OPS.interchange_bwd(grad, *args, coords, delta[:, :-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_with_coords_under_autograd(dtype):
    # with a gradient needed, the op still returns the coords it was asked for, in every dtype
    args = [None if a is None else a.to(dtype).requires_grad_() for a in make_inputs()]
    out, coords = OPS.interchange_fwd(*args, True)
    with torch.no_grad():
        ref_out, ref_coords = OPS.interchange_fwd(*args, True)
    assert coords.shape == ref_coords.shape == (*args[0].shape[:2], args[3].shape[1])
    torch.testing.assert_close(coords, ref_coords, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    out.sum().backward()
    assert all(a.grad is not None for a in args)


def test_bwd_rejects_bad_coords():
    args = make_inputs()
    grad = torch.randn_like(args[0])
    coords = OPS.interchange_fwd(*args, True)[1]
    with pytest.raises(RuntimeError, match="coords must be"):
        OPS.interchange_bwd(grad, *args, coords[:, :-1])
    with pytest.raises(RuntimeError, match="coords"):
        OPS.interchange_bwd(grad, *args, coords.double())


def test_autograd_saves_coords_and_matches_reference():
    # library.interchange_fwd asks for coords when a gradient is needed; the backward reuses them
    args = [None if a is None else a.clone().double().requires_grad_() for a in make_inputs()]
    out = library.interchange_fwd(*args)
    _, coords = OPS.interchange_fwd(*args, True)
    assert not coords.requires_grad
    torch.autograd.gradcheck(lambda *a: library.interchange_fwd(*a), tuple(args))
    ref = [a.detach().clone().requires_grad_() for a in args]
    g = torch.randn_like(out)
    out.backward(g)
    interchange_reference(*ref).backward(g)
    for a, r in zip(args, ref):
        torch.testing.assert_close(a.grad, r.grad)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_opcheck_interchange_rows(config):
    base, source, _, basis, v, m = make_inputs(B=3, T=4, S=2, **config)
    batch_index = torch.tensor([0, 2, 2, 1])
    base_pos = torch.tensor([1, 0, 3, 3])
    source_pos = torch.tensor([1, 0, 1, 0])
    torch.library.opcheck(
        OPS.interchange_rows_,
        (base, source, batch_index, base_pos, source_pos, basis, v, m),
        test_utils=TEST_UTILS,
    )


def test_fake_kernels_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) if a is not None else None for a in make_inputs(mask="shared")]
        out, coords = OPS.interchange_fwd(*args, True)
        grads = OPS.interchange_bwd(torch.empty_like(out), *args, coords)
        _, no_coords = OPS.interchange_fwd(*args)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    assert coords.shape == (*args[0].shape[:2], args[3].shape[1]) and no_coords.shape == (0,)
    assert [tuple(g.shape) for g in grads] == [tuple(a.shape) for a in args]


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[3]], ids=[CONFIG_IDS[0], CONFIG_IDS[3]])
def test_torch_compile_fullgraph_with_backward(config):
    torch._dynamo.reset()
    # No warm-up call: ops loads its compiled backends at import, so the first traced
    # call needs no import inside the graph.
    args = make_inputs(**config)

    def loss_fn(base, source, weights, basis, reflect, mask):
        out = ops.interchange(base, source, weights, basis, reflect, mask, backend="cpp")
        return (out * out).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    leaves_c = [None if a is None else a.clone().requires_grad_() for a in args]
    leaves_r = [None if a is None else a.clone().requires_grad_() for a in args]
    loss_c = compiled(*leaves_c)
    loss_c.backward()
    out_r = interchange_reference(*leaves_r)
    (out_r * out_r).sum().backward()
    torch.testing.assert_close(loss_c, (out_r * out_r).sum().detach(), rtol=1e-5, atol=1e-5)
    for c, r in zip(leaves_c, leaves_r):
        if c is not None:
            torch.testing.assert_close(c.grad, r.grad, rtol=1e-4, atol=1e-5)


def test_auto_order_takes_triton_for_large_soft_calls_on_a_gpu():
    """backend="auto" on a GPU: cuda first (fewest launches, for host-bound eager calls), and
    triton first for soft calls from B*T*d = 2^24 up (measured on an H200: same host time,
    1.6x less GPU time); the CPU order does not depend on the size."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert ops._auto_order(cuda)[0] == ops._auto_order(cuda, 2 ** 24 - 1)[0] == "cuda"
    assert ops._auto_order(cuda, 32 * 128 * 4096) == ["triton", "cuda", "torch"]
    assert ops._auto_order(cpu, 2 ** 30) == ops._auto_order(cpu) == ["cpp", "torch"]


def test_auto_backend_on_cpu_is_cpp():
    assert "cpp" in ops.available_backends("cpu")
    assert ops._pick("auto", torch.device("cpu")) is cpu
    assert cpu.is_available(torch.device("cpu"))
    assert not cpu.is_available(torch.device("meta"))
    assert cpu.ROWS_AUTOGRAD is False


def test_auto_backend_output_equals_cpp():
    args = make_inputs()
    torch.testing.assert_close(ops.interchange(*args), ops.interchange(*args, backend="cpp"), rtol=0, atol=0)


def test_library_wrappers():
    args = make_inputs()
    torch.testing.assert_close(library.interchange_fwd(*args), interchange_reference(*args))
    base, source, _, basis, v, m = args
    out = base.clone()
    bi, ti, si = torch.tensor([1]), torch.tensor([2]), torch.tensor([3])
    assert library.interchange_rows_(out, source, bi, ti, si, basis, v, m) is out
    expected = ops.interchange_rows_reference(base, source, bi, ti, si, basis, v, m)
    torch.testing.assert_close(out, expected)


def test_rows_with_grad_falls_back_to_torch():
    # the C++ rows kernel has no autograd; the dispatcher must route training calls to torch
    base, source, _, basis, v, m = make_inputs()
    basis.requires_grad_()
    triples = torch.tensor([[0, 1, 2], [1, 0, 0]])
    out = ops.interchange_triples(base, source, triples, basis, v, m, backend="cpp")
    assert out.requires_grad
    out.sum().backward()
    assert basis.grad is not None


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("with_basis", [True, False])
def test_inplace_rows_bump_the_version_counter(with_basis, backend):
    """The rows kernels write base through a raw pointer: like any in-place op they must bump
    base's version, so a graph that saved base before the write refuses to backpropagate
    (it computed a silently wrong gradient before), and an inference tensor is refused
    outside inference mode, before anything is written (and accepted inside it). triton:
    under the interpreter, when the conftest enables it."""
    if backend not in ops.available_backends("cpu"):
        pytest.skip(f"{backend} does not run on CPU tensors here")
    base, source, _, basis, v, m = make_inputs()
    subspace = (basis, v, m) if with_basis else (None, None, None)
    index = torch.full(base.shape[:2], ops.KEEP)
    index[0, 1] = 2
    w = torch.ones(base.shape[-1], requires_grad=True)
    h = base.clone()
    y = (w * h).sum()  # saves h
    ops.interchange_hard(h, source, index, *subspace, inplace=True, backend=backend)
    assert h._version >= 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    with torch.inference_mode():
        frozen = base.clone()
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        ops.interchange_hard(frozen, source, index, *subspace, inplace=True, backend=backend)
    assert torch.equal(frozen, base)
    with torch.inference_mode():
        ops.interchange_hard(frozen, source, index, *subspace, inplace=True, backend=backend)
    assert not torch.equal(frozen[0, 1], base[0, 1]) and torch.equal(frozen[1], base[1])


@pytest.mark.parametrize("with_basis", [True, False])
def test_inplace_rows_with_source_aliasing_base(with_basis):
    """interchange_hard(h, h, ...) swaps rows of one stream: every row reads the values from
    before the call, as the torch backend does (the vanilla kernel copied row by row, so a
    row could read another already overwritten)."""
    base, _, _, basis, v, m = make_inputs()
    subspace = (basis, v, m) if with_basis else (None, None, None)
    T = base.shape[1]
    index = torch.full(base.shape[:2], ops.KEEP)
    index[:, 0], index[:, 1] = 1, 0
    expected = ops.interchange_hard(base.clone(), base.clone(), index, *subspace, backend="torch")
    h = base.clone()
    ops.interchange_hard(h, h, index, *subspace, inplace=True, backend="cpp")
    torch.testing.assert_close(h, expected)
    assert T > 2 and torch.equal(h[:, 2:], base[:, 2:])


def test_double_backward_is_refused_not_dropped():
    """A gradient penalty differentiates the op's gradients again. The cpp (and cuda) backward
    has no derivative of its own: it must raise, not let autograd treat the gradients as
    constants (which dropped the second-order terms with only a warning). A first-order
    backward with create_graph=True still works, and the torch backend does the rest."""
    args = [a.detach().clone().requires_grad_() if a is not None else None for a in make_inputs()]
    loss = ops.interchange(*args, backend="cpp").square().sum()
    (g_weights,) = torch.autograd.grad(loss, args[2], create_graph=True)
    expected = torch.autograd.grad(ops.interchange(*args, backend="torch").square().sum(), args[2])[0]
    torch.testing.assert_close(g_weights, expected)
    with pytest.raises(RuntimeError, match="not differentiable.*backend='torch'"):
        g_weights.square().sum().backward()


def test_inference_tensor_inputs_with_a_basis_to_train():
    """Hidden states computed under torch.inference_mode() (a frozen LM) and a basis to train:
    the C++ autograd saves copies of the inference tensors (saving them fails)."""
    args = make_inputs()
    with torch.inference_mode():
        base, source = args[0].clone(), args[1].clone()
    grads = {}
    for backend in ("torch", "cpp", "triton"):
        basis = args[3].detach().clone().requires_grad_()
        ops.interchange(base, source, args[2], basis, *args[4:], backend=backend).square().sum().backward()
        grads[backend] = basis.grad
    torch.testing.assert_close(grads["cpp"], grads["torch"])
    # triton (the interpreter here) copies them too: backend="auto" switches to it for large
    # soft calls on a GPU, where saving them had failed
    torch.testing.assert_close(grads["triton"], grads["torch"])


def test_sparse_inputs_are_refused_by_name():
    args = make_inputs()
    with pytest.raises(ValueError, match="base must be a dense"):
        ops.interchange(args[0].to_sparse(), *args[1:], backend="cpp")
    with pytest.raises(ValueError, match="weights must be a dense"):
        ops.interchange(args[0], args[1], args[2].to_sparse(), *args[3:], backend="cpp")


# ------------------------------------------------------------------------------------
# GPU: the same registration checks on CUDA tensors (the CUDA dispatch key of _C_cuda)
# ------------------------------------------------------------------------------------

needs_cuda_backend = pytest.mark.skipif(
    not (torch.cuda.is_available() and "cuda" in ops.available_backends("cuda")),
    reason="needs a CUDA device and the hyperdas_fast._C_cuda extension",
)


def _to_cuda(args, dtype=None):
    return [None if a is None else a.to("cuda", dtype or a.dtype) for a in args]


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_opcheck_cuda(config, dtype):
    args = _to_cuda(make_inputs(B=3, T=5, S=4, d=40, k=8, **config) if "use_basis" not in config
                    else make_inputs(B=3, T=5, S=4, d=40, **config), dtype)
    grad_args = [None if a is None else a.clone().requires_grad_() for a in args]
    torch.library.opcheck(OPS.interchange_fwd, (*grad_args, True), test_utils=TEST_UTILS)
    grad = torch.randn_like(args[0])
    torch.library.opcheck(OPS.interchange_bwd, (grad, *args, None), test_utils=TEST_UTILS)
    base, source, _, basis, v, m = args
    batch_index = torch.tensor([0, 2, 2, 1], device="cuda")
    base_pos = torch.tensor([1, 0, 3, 4], device="cuda")
    source_pos = torch.tensor([1, 0, 3, 0], device="cuda")
    torch.library.opcheck(OPS.interchange_rows_, (base.clone(), source, batch_index, base_pos, source_pos, basis, v, m),
                          test_utils=TEST_UTILS)
    # g_basis comes back in the basis's layout on CUDA too (AccumulateGrad then copies nothing)
    if basis is not None:
        col_major = basis.t().contiguous().t()
        g_basis = OPS.interchange_bwd(grad, base, source, args[2], col_major, v, m, None)[3]
        assert g_basis.stride() == col_major.stride()


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[3]], ids=[CONFIG_IDS[0], CONFIG_IDS[3]])
def test_torch_compile_inductor_cuda(config):
    """torch.compile with the default (inductor) backend on CUDA: the op stays one fused call."""
    torch._dynamo.reset()
    args = _to_cuda(make_inputs(B=4, T=16, S=12, d=256, k=32, **config) if "use_basis" not in config
                    else make_inputs(B=4, T=16, S=12, d=256, **config))

    def loss_fn(base, source, weights, basis, reflect, mask):
        out = ops.interchange(base, source, weights, basis, reflect, mask, backend="cuda")
        return (out * out).sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    leaves_c = [None if a is None else a.clone().requires_grad_() for a in args]
    leaves_r = [None if a is None else a.double().requires_grad_() for a in args]
    compiled(*leaves_c).backward()
    out_r = interchange_reference(*leaves_r)
    (out_r * out_r).sum().backward()
    for c, r in zip(leaves_c, leaves_r):
        if c is not None:
            torch.testing.assert_close(c.grad.double(), r.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@needs_cuda_backend
def test_auto_backend_on_cuda_is_first_available():
    args = _to_cuda(make_inputs(B=2, T=7, S=5, d=64, k=8))
    expected = ops.interchange(*args, backend=ops._AUTO_ORDER["cuda"][0])
    torch.testing.assert_close(ops.interchange(*args, backend="auto"), expected, rtol=0, atol=0)


@pytest.mark.parametrize("reflect", [True, False])
def test_fwd_train_fake_kernel_on_cuda_tensors(reflect):
    """On CUDA tensors interchange_fwd_train keeps the projections [P_S; P_B (; RV)]
    ([B*S + B*T (+ d), k (+ B)], csrc/common/interchange_projected.h: kept_rows), so its fake
    kernel gives that shape there (fake CUDA tensors need no GPU); on CPU, delta [B, T, d]."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, T, S, d, k = 2, 3, 4, 9, 3
    with FakeTensorMode():
        def make(device):
            base, source = torch.empty(B, T, d, device=device), torch.empty(B, S, d, device=device)
            weights, basis = torch.empty(B, S + 1, T, device=device), torch.empty(d, k, device=device)
            v = torch.empty(B, d, device=device) if reflect else None
            return base, source, weights, basis, v, torch.empty(B, k, device=device)

        out, coords, kept = OPS.interchange_fwd_train(*make("cuda"))
        assert out.shape == (B, T, d) and coords.numel() == 0 and kept.device.type == "cuda"
        assert kept.shape == ((B * S + B * T + d, k + B) if reflect else (B * S + B * T, k))
        _, _, delta = OPS.interchange_fwd_train(*make("cpu"))
        assert delta.shape == (B, T, d)
