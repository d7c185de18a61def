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


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_opcheck_interchange_fwd(config, requires_grad):
    args = make_inputs(**config)
    if requires_grad:
        args = [None if a is None else a.requires_grad_() for a in args]
    torch.library.opcheck(OPS.interchange_fwd, tuple(args), test_utils=TEST_UTILS)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_opcheck_interchange_bwd(config):
    args = make_inputs(**config)
    grad = torch.randn_like(args[0])
    torch.library.opcheck(OPS.interchange_bwd, (grad, *args), test_utils=TEST_UTILS)
    # None inputs get empty gradients; present ones get their input's shape
    grads = OPS.interchange_bwd(grad, *args)
    for g, a in zip(grads, args):
        assert g.shape == (a.shape if a is not None else (0,))


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
        out = OPS.interchange_fwd(*args)
        grads = OPS.interchange_bwd(torch.empty_like(out), *args)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
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
