"""The CUDA projected path's k-space kernels (csrc/cuda/projected_kspace.cuh), run on the CPU.

tests/cuda_emulation/emulate.h turns the kernel source into host C++ (one std::thread per
CUDA thread, __syncthreads as a barrier, __shared__ arrays as statics of the block that
runs), compiled here with g++ and called through ctypes. This checks the kernels' tiling,
padding, reductions and block layout against float64 formulas written from the math, on a
machine without a GPU; the GPU tests (tests/test_ops_cuda_gpu.py via the op) check the real
build.

Everything below is fp32 (the emulation has no bf16), compared with float64 at 1e-4 relative
to the values' scale."""
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cuda_emulation" / "projected_kspace_emulated.cpp"
HEADERS = [ROOT / "tests" / "cuda_emulation" / "emulate.h", *sorted((ROOT / "csrc" / "cuda").glob("*.h")),
           *sorted((ROOT / "csrc" / "cuda").glob("*.cuh"))]


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.fail("no C++ compiler (g++) found: the emulated CUDA kernels need one")
    lib = tmp_path_factory.mktemp("kspace") / "projected_kspace_emulated.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", str(SOURCE), "-o", str(lib)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr}"
    return ctypes.CDLL(str(lib))


def ptr(t):
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def i64(x):
    return ctypes.c_int64(int(x))


def padded_k(k):
    return 64 if k <= 64 else (128 if k <= 128 else 256)


def nan_tensor(*shape):
    """Outputs start as NaN: an entry the kernels never write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=torch.float32)


def make_case(B, T, S, d, k, reflect, mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    case = dict(
        base=torch.randn(B, T, d, **f64), source=torch.randn(B, S, d, **f64), grad=torch.randn(B, T, d, **f64),
        weights=torch.softmax(2 * torch.randn(B, S + 1, T, **f64), dim=1),
        R=torch.linalg.qr(torch.randn(d, k, **f64))[0],
        v=torch.nn.functional.normalize(torch.randn(B, d, **f64), dim=-1) if reflect else None,
        mask={"batch": lambda: torch.rand(B, k, **f64), "shared": lambda: torch.rand(k, **f64),
              None: lambda: None}[mask]())
    # the kernels' inputs, fp32: P = x RV with RV = [R | -2 v^T] (non-finite v zeroed, as rv_of does)
    RV = case["R"] if not reflect else torch.cat([case["R"], torch.nan_to_num(-2 * case["v"].t(), 0.0, 0.0, 0.0)], 1)
    Kc = RV.shape[1]
    case.update(
        Kc=Kc,
        ps=(case["source"] @ RV).reshape(B * S, Kc).float().contiguous(),
        pb=(case["base"] @ RV).reshape(B * T, Kc).float().contiguous(),
        pg=(case["grad"] @ RV).reshape(B * T, Kc).float().contiguous(),
        w32=case["weights"].float().contiguous(),
        u=None if not reflect else (case["v"] @ case["R"]).float().contiguous(),
        m32=None if mask is None else case["mask"].float().contiguous(),
        mask_stride_b=k if mask == "batch" else 0)
    return case


def reference(case, B, T, S, k):
    """Float64 from the definitions: R_b = (I - 2 v v^T) R, delta = mix - base, c = R_b^T delta."""
    R, v, w = case["R"], case["v"], case["weights"]
    Rb = R.expand(B, -1, -1) if v is None else R - 2 * v[:, :, None] * (v @ R)[:, None, :]  # [B, d, k]
    u = torch.zeros(B, k, dtype=torch.float64) if v is None else v @ R
    m = torch.ones(B, 1, k, dtype=torch.float64) if case["mask"] is None else case["mask"].reshape(-1, 1, k).expand(B, 1, k)
    mix = torch.einsum("bst,bsd->btd", w[:, :S], case["source"]) + w[:, S, :, None] * case["base"]
    delta = mix - case["base"]
    c = delta @ Rb
    e = c * m
    ge = case["grad"] @ Rb
    gc = ge * m
    cs, cb = case["source"] @ Rb, case["base"] @ Rb
    vdelta = torch.zeros(B, T, dtype=torch.float64) if v is None else torch.einsum("btd,bd->bt", delta, v)
    vg = torch.zeros(B, T, dtype=torch.float64) if v is None else torch.einsum("btd,bd->bt", case["grad"], v)
    gs = torch.einsum("bst,btk->bsk", w[:, :S], gc)
    wm1 = (w[:, S] - 1)[..., None]
    return dict(
        e=e, ue=(e * u[:, None]).sum(-1), gc=gc, ugc=(gc * u[:, None]).sum(-1), gs=gs,
        ugs=(gs * u[:, None]).sum(-1), wm1=wm1,
        gw=torch.cat([torch.einsum("bsk,btk->bst", cs, gc), (cb * gc).sum(-1)[:, None]], 1),
        gmask=(ge * c).sum(1),
        y_sum=(-2 * vg[..., None] * e - 2 * vdelta[..., None] * gc).sum(1))


def block(x, xu, k, Kc):
    """block(x): [x | xu in column k + b, zeros in the other reflection columns]."""
    B, n, _ = x.shape
    out = torch.zeros(B, n, Kc, dtype=torch.float64)
    out[..., :k] = x
    for b in range(B):
        if Kc > k:
            out[b, :, k + b] = xu[b]
    return out.reshape(B * n, Kc)


def close(actual, expected, what):
    expected = expected.double()
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual.double() - expected).abs().max().item()
    assert err <= 1e-4 * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


SHAPES = [  # B, T, S, d, k
    (1, 1, 1, 8, 1),
    (3, 5, 7, 24, 5),
    (2, 37, 45, 40, 16),   # several row and source tiles, partial last ones
    (3, 17, 33, 70, 64),   # k == padded k
    (2, 20, 3, 130, 65),   # k just past a padding step
    (2, 9, 20, 140, 128),
    (1, 3, 2, 300, 129),   # KP = 256
]
CONFIGS = [(True, "batch"), (True, "shared"), (True, None), (False, "batch"), (False, None)]


@pytest.mark.parametrize("reflect,mask", CONFIGS)
@pytest.mark.parametrize("B,T,S,d,k", SHAPES)
def test_forward_kernel(emulated, B, T, S, d, k, reflect, mask):
    case = make_case(B, T, S, d, k, reflect, mask)
    ref = reference(case, B, T, S, k)
    Kc, KP = case["Kc"], padded_k(k)
    rows_pad = (T + 63) // 64 * 64  # the apply kernel's layout
    blk, e, eu = nan_tensor(B * T, Kc), nan_tensor(B * rows_pad, KP), nan_tensor(B * rows_pad)
    rc = emulated.emulated_forward(ptr(case["ps"]), ptr(case["pb"]), ptr(case["w32"]), ptr(case["u"]),
                                   ptr(case["m32"]), i64(case["mask_stride_b"]), ptr(blk), ptr(e), ptr(eu),
                                   i64(B), i64(T), i64(S), i64(rows_pad), k, Kc)
    assert rc == 0
    close(blk, block(ref["e"], ref["ue"], k, Kc), "block(e)")
    e_expected = torch.zeros(B, rows_pad, KP, dtype=torch.float64)
    e_expected[:, :T, :k] = ref["e"]
    eu_expected = torch.zeros(B, rows_pad, dtype=torch.float64)
    eu_expected[:, :T] = ref["ue"]
    close(e.view(B, rows_pad, KP), e_expected, "e (padded layout)")
    close(eu.view(B, rows_pad), eu_expected, "u.e (padded layout)")
    # the output GEMM the binding runs next: base + block(e) RV^T is the interchange
    RV = case["R"] if not reflect else torch.cat([case["R"], -2 * case["v"].t()], 1)
    from hyperdas_fast.ops.reference import interchange_reference

    out = case["base"].reshape(B * T, d) + blk.double() @ RV.t()
    expected = interchange_reference(case["base"], case["source"], case["weights"], case["R"], case["v"], case["mask"])
    close(out.view(B, T, d), expected, "base + block(e) RV^T")


def test_forward_kernel_block_only(emulated):
    """Without the e layout (the cuBLAS output path), only the T real rows exist."""
    B, T, S, d, k = 2, 21, 6, 32, 8
    case = make_case(B, T, S, d, k, True, "batch")
    ref = reference(case, B, T, S, k)
    blk = nan_tensor(B * T, case["Kc"])
    rc = emulated.emulated_forward(ptr(case["ps"]), ptr(case["pb"]), ptr(case["w32"]), ptr(case["u"]),
                                   ptr(case["m32"]), i64(k), ptr(blk), ptr(None), ptr(None),
                                   i64(B), i64(T), i64(S), i64(0), k, case["Kc"])
    assert rc == 0
    close(blk, block(ref["e"], ref["ue"], k, case["Kc"]), "block(e)")


@pytest.mark.parametrize("reflect,mask", CONFIGS)
@pytest.mark.parametrize("B,T,S,d,k", SHAPES)
def test_backward_kernels(emulated, B, T, S, d, k, reflect, mask):
    case = make_case(B, T, S, d, k, reflect, mask, seed=1)
    ref = reference(case, B, T, S, k)
    Kc = case["Kc"]
    tiles = (T + 15) // 16
    ag, ab, as_ = nan_tensor(B * T, Kc), nan_tensor(B * T, Kc), nan_tensor(B * S, Kc)
    gc, ugc, gw = nan_tensor(B * T, k), nan_tensor(B * T), nan_tensor(B, S + 1, T)
    gmask_part = nan_tensor(B, tiles, k) if mask else None
    y_part = nan_tensor(B, tiles, k) if reflect else None
    rc = emulated.emulated_backward(ptr(case["ps"]), ptr(case["pb"]), ptr(case["pg"]), ptr(case["w32"]),
                                    ptr(case["u"]), ptr(case["m32"]), i64(case["mask_stride_b"]), ptr(ag), ptr(ab),
                                    ptr(as_), ptr(gc), ptr(ugc), ptr(gw), ptr(gmask_part), ptr(y_part),
                                    i64(B), i64(T), i64(S), k, Kc)
    assert rc == 0
    close(gc.view(B, T, k), ref["gc"], "g_c")
    if reflect:
        close(ugc.view(B, T), ref["ugc"], "u.g_c")
        close(y_part.sum(1), ref["y_sum"], "y_sum (tile partials summed)")
    close(gw, ref["gw"], "g_w")
    if mask:
        close(gmask_part.sum(1), ref["gmask"], "g_mask (tile partials summed)")
    close(ag, block(ref["e"], ref["ue"], k, Kc), "block(e)")
    close(ab, block(ref["wm1"] * ref["gc"], ref["wm1"][..., 0] * ref["ugc"], k, Kc), "block((w_self - 1) g_c)")
    close(as_, block(ref["gs"], ref["ugs"], k, Kc), "block(W_src g_c)")


def test_backward_with_no_base_rows_still_writes_the_source_blocks(emulated):
    """T = 0 (only a raw op call can ask): block(W_src g_c) is block(0), not left unwritten
    for the GEMMs that read it."""
    B, S, k, Kc = 2, 3, 4, 6
    z = torch.zeros(1)
    ps = torch.randn(B * S, Kc)
    as_ = nan_tensor(B * S, Kc)
    rc = emulated.emulated_backward(ptr(ps), ptr(z), ptr(z), ptr(torch.zeros(B, S + 1, 0)), ptr(torch.randn(B, k)),
                                    ptr(None), i64(0), ptr(z), ptr(z), ptr(as_), ptr(z), ptr(z),
                                    ptr(torch.zeros(B, S + 1, 0)), ptr(None), ptr(z), i64(B), i64(0), i64(S), k, Kc)
    assert rc == 0
    assert torch.equal(as_, torch.zeros(B * S, Kc))


def test_nonfinite_reflect_stays_in_its_example(emulated):
    """One example's non-finite v makes its own rows non-finite; the others' blocks (whose
    column k + 0 belongs to example 0) stay finite and exact zeros there."""
    B, T, S, d, k = 3, 6, 5, 16, 4
    case = make_case(B, T, S, d, k, True, None)
    case["u"][0, 1] = float("inf")
    blk = nan_tensor(B * T, case["Kc"])
    emulated.emulated_forward(ptr(case["ps"]), ptr(case["pb"]), ptr(case["w32"]), ptr(case["u"]), ptr(None),
                              i64(0), ptr(blk), ptr(None), ptr(None), i64(B), i64(T), i64(S), i64(0), k, case["Kc"])
    rows = blk.view(B, T, -1)
    assert not torch.isfinite(rows[0]).all()
    assert torch.isfinite(rows[1:]).all()
    assert (rows[1:, :, k] == 0).all()


def test_refuses_k_beyond_its_registers(emulated):
    z = torch.zeros(1)
    assert emulated.emulated_forward(ptr(z), ptr(z), ptr(z), ptr(None), ptr(None), i64(0), ptr(z), ptr(None),
                                     ptr(None), i64(1), i64(1), i64(1), i64(0), 257, 257) == 1
