"""Triton backend of the interchange op (soft form with autograd, hard rows form).

Math (HYPERDAS.md section 1), per token with R [d, k], v [d], u = R^T v, m [k]:

    delta = mix - base,  mix = sum_s w[s] source[s] + w[S] base
    c     = R^T delta - 2 (v.delta) u          (= R_b^T delta)
    e     = m * c
    out   = base + R e - 2 (u.e) v             (= base + R_b e)

Kernels (all accumulate in fp32; tl.dot runs on tensor cores for bf16/fp16 and with
``input_precision="ieee"`` for fp32 so results match torch's fp32 matmul, which does not
use TF32 by default):

- ``_coords_kernel``: a tile of BT rows x BK subspace columns x one slice of d (d is split
  into DSPLIT slices so 64-row tiles still fill the GPU; per-slice partial sums go to an
  fp32 scratch [DSPLIT, rows, k], deterministic, no atomics). Loops over its slice in BD
  chunks, builds the mix in-kernel from source tiles (tl.dot of w^T [BT, BS] and source
  [BS, BD]) and accumulates delta @ R and v.delta. In the backward it also accumulates
  g @ R and v.g, and can store delta for the basis/reflect reductions. The same kernel
  serves the hard rows mode (ROWS=True): rows are gathered by (batch_index, base_pos,
  source_pos) and delta = source row - base row.
- ``_apply_kernel``: sums the partials, c = (delta R) - 2 (v.delta) u, e = m c, then
  out = base + e R^T - 2 (e.u) v for a tile of rows and a span of d.
  In rows mode out aliases base (in place) or its clone; rows are unique so each element
  is read and written by one program only, and the coords kernel has finished reading.
- ``_bwd_delta_kernel``: g_delta = R g_c - 2 (u.g_c) v, g_base = g - (1 - w_self) g_delta,
  g_w[b, s, t] = <g_delta, source[s]> (tl.dot) and g_w[b, S, t] = <g_delta, base>; g_delta
  itself stays in registers.

Done with torch ops (small or GEMM-shaped reductions where cuBLAS is as good as a custom
kernel; each is commented where it happens): u = R^T v, in the backward the sums of the
d-split partials and the reflection correction on [rows, k], g_mask, g_c = m g_e, u.g_c,
g_source = (w_src g_c) R^T - 2 (w_src (u.g_c)) v^T (bmm on [B, S, k], one mm), g_basis (two [d, N] x [N, k] mm plus a rank-B term),
g_reflect (two bmm plus a [B, k] x [k, d] mm), vanilla rows (an index copy), float64
inputs (the torch reference: the kernels are written for fp32/fp16/bf16).

The backward, and the forward from B*T*d >= 2^19 (``triton_projected.soft_path``;
HYPERDAS_FAST_TRITON_SOFT=fused|projected|onepass forces a path), take the projected path in
``triton_projected.py`` instead: cuBLAS GEMMs over d and Triton kernels in k dimensions, so
the mix is never formed in d dimensions. Both were faster that way on an H200.

On CPU tensors the kernels run through the Triton interpreter (TRITON_INTERPRET=1, set
before triton is imported); that is only for tests.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

try:  # the module must raise ImportError (not fail otherwise) when triton is unusable
    import triton
    import triton.language as tl
except Exception as exc:  # pragma: no cover - depends on the installation
    raise ImportError(f"triton is not usable: {exc}") from exc

from . import triton_projected
from .reference import interchange_reference, interchange_rows_reference

ROWS_AUTOGRAD = False

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_available(device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _row_offsets(pid_tile, pid_b, bidx_ptr, tpos_ptr, spos_ptr, T, S, d, P,
                 ROWS: tl.constexpr, BT: tl.constexpr):
    """Row ids (for [rows, k] scratch), batch of each row, element offsets of the base row
    and of the source row (rows mode), and the validity mask."""
    r = pid_tile * BT + tl.arange(0, BT)
    if ROWS:
        valid = r < P
        brow = tl.load(bidx_ptr + r, mask=valid, other=0).to(tl.int64)
        trow = tl.load(tpos_ptr + r, mask=valid, other=0).to(tl.int64)
        srow = tl.load(spos_ptr + r, mask=valid, other=0).to(tl.int64)
        rid = r.to(tl.int64)
        base_off = (brow * T + trow) * d
        src_off = (brow * S + srow) * d
    else:
        valid = r < T
        brow = tl.zeros([BT], dtype=tl.int64) + pid_b
        trow = r.to(tl.int64)
        rid = brow * T + trow
        base_off = rid * d
        src_off = base_off  # unused in soft mode
    return rid, brow, trow, base_off, src_off, valid


@triton.jit
def _coords_kernel(
    base_ptr, src_ptr, w_ptr, R_ptr, v_ptr,
    c_ptr, vd_ptr,
    g_ptr, ge_ptr, vg_ptr, delta_ptr,
    bidx_ptr, tpos_ptr, spos_ptr,
    T, S, d, k, P, nrows, DSPLIT, SPAN,
    ROWS: tl.constexpr, HAS_REFLECT: tl.constexpr, HAS_GRAD: tl.constexpr,
    STORE_DELTA: tl.constexpr, IEEE: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    pid_k = tl.program_id(1) // DSPLIT
    split = tl.program_id(1) % DSPLIT
    pid_b = tl.program_id(2).to(tl.int64)
    rid, brow, trow, base_off, src_off, valid = _row_offsets(
        pid_tile, pid_b, bidx_ptr, tpos_ptr, spos_ptr, T, S, d, P, ROWS, BT)
    kcols = pid_k * BK + tl.arange(0, BK)
    kvalid = kcols < k
    first_k = (tl.zeros([BT], dtype=tl.int32) + pid_k) == 0  # vector: the interpreter wants block masks

    acc = tl.zeros([BT, BK], dtype=tl.float32)
    vd = tl.zeros([BT], dtype=tl.float32)
    if HAS_GRAD:
        acc_g = tl.zeros([BT, BK], dtype=tl.float32)
        vg = tl.zeros([BT], dtype=tl.float32)
    if not ROWS:
        # [SELF] weight of each row: w[b, S, t]
        w_b = w_ptr + pid_b * (S + 1) * T
        wself = tl.load(w_b + S * T + trow, mask=valid, other=0.0).to(tl.float32)

    d_start = split * SPAN
    d_end = tl.minimum(d, d_start + SPAN)
    for d0 in range(d_start, d_end, BD):
        dcols = d0 + tl.arange(0, BD)
        dvalid = dcols < d_end
        m2 = valid[:, None] & dvalid[None, :]
        x = tl.load(base_ptr + base_off[:, None] + dcols[None, :], mask=m2, other=0.0)
        if ROWS:
            y = tl.load(src_ptr + src_off[:, None] + dcols[None, :], mask=m2, other=0.0)
            delta = y.to(tl.float32) - x.to(tl.float32)
        else:
            mix = tl.zeros([BT, BD], dtype=tl.float32)
            for s0 in range(0, S, BS):
                scols = s0 + tl.arange(0, BS)
                svalid = scols < S
                wt = tl.load(w_b + scols[None, :] * T + trow[:, None],
                             mask=valid[:, None] & svalid[None, :], other=0.0)  # [BT, BS]
                st = tl.load(src_ptr + (pid_b * S + scols[:, None]) * d + dcols[None, :],
                             mask=svalid[:, None] & dvalid[None, :], other=0.0)  # [BS, BD]
                if IEEE:
                    mix = tl.dot(wt, st, mix, input_precision="ieee")
                else:
                    mix = tl.dot(wt, st, mix)
            mix = mix + wself[:, None] * x.to(tl.float32)
            delta = mix - x.to(tl.float32)
        if STORE_DELTA:
            tl.store(delta_ptr + base_off[:, None] + dcols[None, :],
                     delta.to(delta_ptr.dtype.element_ty), mask=m2 & first_k[:, None])
        rt = tl.load(R_ptr + dcols[:, None] * k + kcols[None, :],
                     mask=dvalid[:, None] & kvalid[None, :], other=0.0)  # [BD, BK]
        if IEEE:
            acc = tl.dot(delta, rt, acc, input_precision="ieee")
        else:
            acc = tl.dot(delta.to(rt.dtype), rt, acc)
        if HAS_GRAD:
            gt = tl.load(g_ptr + base_off[:, None] + dcols[None, :], mask=m2, other=0.0)
            if IEEE:
                acc_g = tl.dot(gt, rt, acc_g, input_precision="ieee")
            else:
                acc_g = tl.dot(gt.to(rt.dtype), rt, acc_g)
        if HAS_REFLECT:
            vt = tl.load(v_ptr + brow[:, None] * d + dcols[None, :], mask=m2, other=0.0).to(tl.float32)
            vd += tl.sum(delta * vt, axis=1)
            if HAS_GRAD:
                vg += tl.sum(gt.to(tl.float32) * vt, axis=1)

    # Partial sums of this d slice: [DSPLIT, nrows, k] and [DSPLIT, nrows]. The reflection
    # correction -2 (v.delta) u needs the full v.delta, so the consumer applies it.
    mk = valid[:, None] & kvalid[None, :]
    part = split.to(tl.int64) * nrows
    if HAS_REFLECT:
        tl.store(vd_ptr + part + rid, vd, mask=valid & first_k)
        if HAS_GRAD:
            tl.store(vg_ptr + part + rid, vg, mask=valid & first_k)
    tl.store(c_ptr + (part + rid[:, None]) * k + kcols[None, :], acc, mask=mk)
    if HAS_GRAD:
        tl.store(ge_ptr + (part + rid[:, None]) * k + kcols[None, :], acc_g, mask=mk)


@triton.jit
def _load_e(c_ptr, vd, u_ptr, m_ptr, m_stride_b, rid, brow, kcols, valid, k, nrows, DSPLIT,
            HAS_REFLECT: tl.constexpr, HAS_MASK: tl.constexpr):
    """e = m * (sum_split c_part - 2 (v.delta) u) for rows rid and columns kcols (fp32)."""
    mk = valid[:, None] & (kcols < k)[None, :]
    c = tl.zeros(mk.shape, dtype=tl.float32)
    for sp in range(0, DSPLIT):
        c += tl.load(c_ptr + (sp * nrows + rid[:, None]) * k + kcols[None, :], mask=mk, other=0.0)
    if HAS_REFLECT:
        c = c - 2.0 * vd[:, None] * tl.load(u_ptr + brow[:, None] * k + kcols[None, :], mask=mk, other=0.0)
    if HAS_MASK:
        c = c * tl.load(m_ptr + brow[:, None] * m_stride_b + kcols[None, :], mask=mk, other=0.0).to(tl.float32)
    return c


@triton.jit
def _apply_kernel(
    base_ptr, out_ptr, c_ptr, vd_ptr, m_ptr, m_stride_b, R_ptr, v_ptr, u_ptr,
    bidx_ptr, tpos_ptr, spos_ptr,
    T, S, d, k, P, nrows, DSPLIT, DSPAN,
    ROWS: tl.constexpr, HAS_REFLECT: tl.constexpr, HAS_MASK: tl.constexpr,
    IEEE: tl.constexpr, ONE_K: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rid, brow, trow, base_off, src_off, valid = _row_offsets(
        pid_tile, pid_b, bidx_ptr, tpos_ptr, spos_ptr, T, S, d, P, ROWS, BT)

    # v.delta (sum of the d-split partials), then e = m * c and e.u (needs all k columns)
    vd = tl.zeros([BT], dtype=tl.float32)
    eu = tl.zeros([BT], dtype=tl.float32)
    if HAS_REFLECT:
        for sp in range(0, DSPLIT):
            vd += tl.load(vd_ptr + sp * nrows + rid, mask=valid, other=0.0)
        for k0 in range(0, k, BK):
            kcols = k0 + tl.arange(0, BK)
            e = _load_e(c_ptr, vd, u_ptr, m_ptr, m_stride_b, rid, brow, kcols, valid, k, nrows, DSPLIT,
                        HAS_REFLECT, HAS_MASK)
            eu += tl.sum(e * tl.load(u_ptr + brow[:, None] * k + kcols[None, :],
                                     mask=valid[:, None] & (kcols < k)[None, :], other=0.0), axis=1)
    if ONE_K:
        kcols1 = tl.arange(0, BK)
        e1 = _load_e(c_ptr, vd, u_ptr, m_ptr, m_stride_b, rid, brow, kcols1, valid, k, nrows, DSPLIT,
                     HAS_REFLECT, HAS_MASK)
        if not IEEE:
            e1 = e1.to(R_ptr.dtype.element_ty)

    d_start = pid_d * DSPAN
    for d0 in range(d_start, d_start + DSPAN, BD):
        dcols = d0 + tl.arange(0, BD)
        dvalid = dcols < d
        m2 = valid[:, None] & dvalid[None, :]
        acc = tl.zeros([BT, BD], dtype=tl.float32)
        if ONE_K:
            rT = tl.load(R_ptr + dcols[None, :] * k + kcols1[:, None],
                         mask=(kcols1 < k)[:, None] & dvalid[None, :], other=0.0)  # [BK, BD]
            if IEEE:
                acc = tl.dot(e1, rT, acc, input_precision="ieee")
            else:
                acc = tl.dot(e1, rT, acc)
        else:
            for k0 in range(0, k, BK):
                kcols = k0 + tl.arange(0, BK)
                kvalid = kcols < k
                e = _load_e(c_ptr, vd, u_ptr, m_ptr, m_stride_b, rid, brow, kcols, valid, k, nrows, DSPLIT,
                            HAS_REFLECT, HAS_MASK)
                rT = tl.load(R_ptr + dcols[None, :] * k + kcols[:, None],
                             mask=kvalid[:, None] & dvalid[None, :], other=0.0)
                if IEEE:
                    acc = tl.dot(e, rT, acc, input_precision="ieee")
                else:
                    acc = tl.dot(e.to(rT.dtype), rT, acc)
        x = tl.load(base_ptr + base_off[:, None] + dcols[None, :], mask=m2, other=0.0).to(tl.float32)
        res = x + acc
        if HAS_REFLECT:
            vt = tl.load(v_ptr + brow[:, None] * d + dcols[None, :], mask=m2, other=0.0).to(tl.float32)
            res = res - 2.0 * eu[:, None] * vt
        tl.store(out_ptr + base_off[:, None] + dcols[None, :], res.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _mix_kernel(
    base_ptr, src_ptr, w_ptr, out_ptr, T, S, d, DSPAN,
    IEEE: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
):
    """Vanilla interchange: out = w_src^T source + w_self base."""
    pid_tile = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    t = pid_tile * BT + tl.arange(0, BT)
    valid = t < T
    w_b = w_ptr + pid_b * (S + 1) * T
    wself = tl.load(w_b + S * T + t, mask=valid, other=0.0).to(tl.float32)
    row_off = (pid_b * T + t) * d
    d_start = pid_d * DSPAN
    for d0 in range(d_start, d_start + DSPAN, BD):
        dcols = d0 + tl.arange(0, BD)
        dvalid = dcols < d
        m2 = valid[:, None] & dvalid[None, :]
        mix = tl.zeros([BT, BD], dtype=tl.float32)
        for s0 in range(0, S, BS):
            scols = s0 + tl.arange(0, BS)
            svalid = scols < S
            wt = tl.load(w_b + scols[None, :] * T + t[:, None], mask=valid[:, None] & svalid[None, :], other=0.0)
            st = tl.load(src_ptr + (pid_b * S + scols[:, None]) * d + dcols[None, :],
                         mask=svalid[:, None] & dvalid[None, :], other=0.0)
            if IEEE:
                mix = tl.dot(wt, st, mix, input_precision="ieee")
            else:
                mix = tl.dot(wt, st, mix)
        x = tl.load(base_ptr + row_off[:, None] + dcols[None, :], mask=m2, other=0.0).to(tl.float32)
        mix = mix + wself[:, None] * x
        tl.store(out_ptr + row_off[:, None] + dcols[None, :], mix.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _bwd_delta_kernel(
    g_ptr, base_ptr, src_ptr, w_ptr, R_ptr, v_ptr,
    gc_ptr, ugc_ptr,
    gbase_ptr, gw_ptr,
    T, S, d, k,
    HAS_BASIS: tl.constexpr, HAS_REFLECT: tl.constexpr, IEEE: tl.constexpr, ONE_K: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
):
    """Per (token tile, source chunk, batch): loops over d.

    g_delta = R g_c - 2 (u.g_c) v  (g_delta = g without a basis; not stored: see _backward)
    g_base  = g - (1 - w_self) g_delta            (source chunk 0 only)
    g_w[b, s, t] = <g_delta[t], source[s]>        (this program's source chunk)
    g_w[b, S, t] = <g_delta[t], base[t]>           (source chunk 0 only)
    """
    pid_tile = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    t = pid_tile * BT + tl.arange(0, BT)
    valid = t < T
    rid = pid_b * T + t
    row_off = rid * d
    first_s = (tl.zeros([BT], dtype=tl.int32) + pid_s) == 0
    w_b = w_ptr + pid_b * (S + 1) * T
    wself = tl.load(w_b + S * T + t, mask=valid, other=0.0).to(tl.float32)
    scols = pid_s * BS + tl.arange(0, BS)
    svalid = scols < S

    if HAS_BASIS:
        if HAS_REFLECT:
            ugc = tl.load(ugc_ptr + rid, mask=valid, other=0.0)
        if ONE_K:
            kcols1 = tl.arange(0, BK)
            gc1 = tl.load(gc_ptr + rid[:, None] * k + kcols1[None, :],
                          mask=valid[:, None] & (kcols1 < k)[None, :], other=0.0)
            if not IEEE:
                gc1 = gc1.to(R_ptr.dtype.element_ty)

    acc_w = tl.zeros([BT, BS], dtype=tl.float32)
    acc_self = tl.zeros([BT], dtype=tl.float32)
    for d0 in range(0, d, BD):
        dcols = d0 + tl.arange(0, BD)
        dvalid = dcols < d
        m2 = valid[:, None] & dvalid[None, :]
        gt = tl.load(g_ptr + row_off[:, None] + dcols[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_BASIS:
            gd = tl.zeros([BT, BD], dtype=tl.float32)
            if ONE_K:
                rT = tl.load(R_ptr + dcols[None, :] * k + kcols1[:, None],
                             mask=(kcols1 < k)[:, None] & dvalid[None, :], other=0.0)
                if IEEE:
                    gd = tl.dot(gc1, rT, gd, input_precision="ieee")
                else:
                    gd = tl.dot(gc1, rT, gd)
            else:
                for k0 in range(0, k, BK):
                    kcols = k0 + tl.arange(0, BK)
                    kvalid = kcols < k
                    gc = tl.load(gc_ptr + rid[:, None] * k + kcols[None, :],
                                 mask=valid[:, None] & kvalid[None, :], other=0.0)
                    rT = tl.load(R_ptr + dcols[None, :] * k + kcols[:, None],
                                 mask=kvalid[:, None] & dvalid[None, :], other=0.0)
                    if IEEE:
                        gd = tl.dot(gc, rT, gd, input_precision="ieee")
                    else:
                        gd = tl.dot(gc.to(rT.dtype), rT, gd)
            if HAS_REFLECT:
                vt = tl.load(v_ptr + pid_b * d + dcols, mask=dvalid, other=0.0).to(tl.float32)
                gd = gd - 2.0 * ugc[:, None] * vt[None, :]
        else:
            gd = gt
        gb = gt - (1.0 - wself[:, None]) * gd
        tl.store(gbase_ptr + row_off[:, None] + dcols[None, :], gb.to(gbase_ptr.dtype.element_ty),
                 mask=m2 & first_s[:, None])
        x = tl.load(base_ptr + row_off[:, None] + dcols[None, :], mask=m2, other=0.0).to(tl.float32)
        acc_self += tl.sum(gd * x, axis=1)
        sT = tl.load(src_ptr + (pid_b * S + scols[None, :]) * d + dcols[:, None],
                     mask=dvalid[:, None] & svalid[None, :], other=0.0)  # [BD, BS]
        if IEEE:
            acc_w = tl.dot(gd, sT, acc_w, input_precision="ieee")
        else:
            acc_w = tl.dot(gd.to(sT.dtype), sT, acc_w)
    tl.store(gw_ptr + pid_b * (S + 1) * T + scols[None, :] * T + t[:, None], acc_w,
             mask=valid[:, None] & svalid[None, :])
    tl.store(gw_ptr + pid_b * (S + 1) * T + S * T + t, acc_self, mask=valid & first_s)


# --------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------


def _interpreting(t: Tensor) -> bool:
    return t.device.type == "cpu"


def _p2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _config(x: Tensor, rows_per_batch: int, batches: int, d: int, k: Optional[int], S: int) -> dict:
    """Block sizes per kernel.

    coords (BT1 x BK tiles, loops over a d slice of SPAN1): 64-row tiles keep the L2 traffic
    of re-reading R (d*k per tile) low, and d is split into DSPLIT slices (partial sums,
    summed by the consumer: deterministic, no atomics) so the grid fills the GPU.
    apply / vanilla mix (BT2 x BD2 tiles over a d span DSPAN2): split over d freely.
    backward g_delta (BT3 rows, loops over all of d for the g_w reduction).
    The interpreter gets small blocks and still splits d so every code path runs.
    """
    kk = k or 16
    if _interpreting(x):
        BD1 = 32
        nch = triton.cdiv(d, BD1)
        span = triton.cdiv(nch, min(2, nch))
        return dict(BT1=16, BK=_p2(kk, 16, 32), BD1=BD1, BS=16, W1=1,
                    DSPLIT=triton.cdiv(nch, span), SPAN1=span * BD1,
                    BT2=16, BD2=32, DSPAN2=64, W2=1, BT3=16, BD3=32, W3=1)
    sms = _num_sms(x.device)
    ieee = x.dtype == torch.float32
    BK = _p2(kk, 16, 128)
    BS = _p2(S, 16, 64)
    # Sizes checked by AOT-compiling for sm_90 (no spills for bf16/fp16 at <= ~200 registers;
    # fp32 "ieee" dots run on FMA units and need smaller tiles to avoid spilling and to stay
    # inside the A100's 164 KB of shared memory).
    BT1, BD1 = (32, 32) if ieee else (64, 32)
    tiles1 = triton.cdiv(rows_per_batch, BT1) * batches * triton.cdiv(kk, BK)
    nch = triton.cdiv(d, BD1)
    want = max(1, min(nch, 16, (2 * sms) // tiles1))  # one wave of ~2 CTAs per SM
    span = triton.cdiv(nch, want)
    BT2, BD2 = (32, 64 if kk <= BK else 32) if ieee else (64, 64)
    tiles2 = triton.cdiv(rows_per_batch, BT2) * batches
    nch2 = triton.cdiv(d, BD2)
    spans = max(1, min(nch2, triton.cdiv(4 * sms, tiles2)))
    BT3 = 32 if triton.cdiv(rows_per_batch, 32) * batches >= 2 * sms else 16
    BD3 = 32 if ieee else (64 if BK >= 128 else 128)
    return dict(BT1=BT1, BK=BK, BD1=BD1, BS=BS, W1=8, DSPLIT=triton.cdiv(nch, span), SPAN1=span * BD1,
                BT2=BT2, BD2=BD2, DSPAN2=triton.cdiv(nch2, spans) * BD2, W2=8,
                BT3=BT3, BD3=BD3, W3=4)


def _ieee(x: Tensor) -> bool:
    return x.dtype == torch.float32


def _expanded_mask(mask: Optional[Tensor], batch: int, k: int, device) -> Tuple[Tensor, int]:
    if mask is None:
        return torch.empty(1, device=device, dtype=torch.float32), 0
    mask = mask.contiguous()
    return mask, (k if mask.dim() == 2 else 0)


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in fp32. For bf16/fp16 CUDA operands one cuBLAS call with an fp32 result
    (mm's out_dtype: products exact, fp32 sums, as the fp32 GEMM of the upcast operands)
    where the upcasts and an fp32 GEMM took four kernels, ~15 us on an H200 at d = 4096."""
    out = triton_projected.out_dtype_gemms("mm", a, b, lambda: torch.mm(a, b, out_dtype=torch.float32))
    return out if out is not None else a.float() @ b.float()


def _u(basis: Tensor, reflect: Optional[Tensor]) -> Tensor:
    # u = R^T v: [B, k], a tiny GEMM done by torch in fp32.
    if reflect is None:
        return torch.empty(1, device=basis.device, dtype=torch.float32)
    return _mm_fp32(reflect, basis).contiguous()


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _launch_coords(base, source, weights, basis, reflect, cfg, grad=None, store_delta=False, rows=None):
    """Partial sums over DSPLIT d slices: c [DSPLIT, rows, k] = delta @ R, v.delta
    [DSPLIT, rows] (fp32); with grad also g @ R and v.g; with store_delta, delta [B, T, d]."""
    B, T, d = base.shape
    S = source.shape[1]
    k = basis.shape[1]
    dev = base.device
    nsplit = cfg["DSPLIT"]
    nk = triton.cdiv(k, cfg["BK"])
    if rows is None:
        nrows, P = B * T, 0
        bidx = tpos = spos = torch.empty(1, device=dev, dtype=torch.int64)
        grid = (triton.cdiv(T, cfg["BT1"]), nk * nsplit, B)
    else:
        bidx, tpos, spos = rows
        P = nrows = bidx.numel()
        grid = (triton.cdiv(P, cfg["BT1"]), nk * nsplit, 1)
    f32 = dict(device=dev, dtype=torch.float32)
    c = torch.empty(nsplit, nrows, k, **f32)
    vd = torch.empty(nsplit, nrows if reflect is not None else 1, **f32)
    dummy = torch.empty(1, **f32)
    ge = torch.empty(nsplit, nrows, k, **f32) if grad is not None else dummy
    vg = torch.empty(nsplit, nrows if (grad is not None and reflect is not None) else 1, **f32)
    delta = torch.empty_like(base) if store_delta else dummy
    _coords_kernel[grid](
        base, source, weights if weights is not None else dummy, basis,
        reflect if reflect is not None else dummy,
        c, vd, grad if grad is not None else dummy, ge, vg, delta,
        bidx, tpos, spos,
        T, S, d, k, P, nrows, nsplit, cfg["SPAN1"],
        ROWS=rows is not None, HAS_REFLECT=reflect is not None, HAS_GRAD=grad is not None,
        STORE_DELTA=store_delta, IEEE=_ieee(base),
        BT=cfg["BT1"], BK=cfg["BK"], BD=cfg["BD1"], BS=cfg["BS"], num_warps=cfg["W1"],
    )
    return c, vd, ge, vg, delta


def _launch_apply(base, out, c, vd, mask, basis, reflect, u, cfg, rows=None):
    """out = base + e R^T - 2 (e.u) v with e = m (sum c - 2 (sum vd) u)."""
    B, T, d = base.shape
    k = basis.shape[1]
    dev = base.device
    m, m_stride = _expanded_mask(mask, B, k, dev)
    if rows is None:
        P, nrows = 0, B * T
        bidx = tpos = spos = torch.empty(1, device=dev, dtype=torch.int64)
        ntile, nb = triton.cdiv(T, cfg["BT2"]), B
    else:
        bidx, tpos, spos = rows
        P = nrows = bidx.numel()
        ntile, nb = triton.cdiv(P, cfg["BT2"]), 1
    DSPAN = cfg["DSPAN2"]
    grid = (ntile, triton.cdiv(d, DSPAN), nb)
    dummy = torch.empty(1, device=dev, dtype=torch.float32)
    _apply_kernel[grid](
        base, out, c, vd, m, m_stride, basis, reflect if reflect is not None else dummy, u,
        bidx, tpos, spos,
        T, 0, d, k, P, nrows, c.shape[0], DSPAN,
        ROWS=rows is not None, HAS_REFLECT=reflect is not None, HAS_MASK=mask is not None,
        IEEE=_ieee(base), ONE_K=k <= cfg["BK"],
        BT=cfg["BT2"], BK=cfg["BK"], BD=min(cfg["BD2"], DSPAN), num_warps=cfg["W2"],
    )
    return out


def _forward(base, source, weights, basis, reflect, mask) -> Tensor:
    B, T, d = base.shape
    S = source.shape[1]
    base = base.contiguous()
    source = source.contiguous()
    weights = weights.contiguous()
    if basis is not None:
        basis = basis.contiguous()
        reflect = reflect.contiguous() if reflect is not None else None
        u = _u(basis, reflect)
        path = triton_projected.soft_path(B, T, d, basis.shape[1])
        if path != "fused":
            m, m_stride = _expanded_mask(mask, B, basis.shape[1], base.device)
            fwd = {"onepass": triton_projected.forward_onepass,
                   "chunked": triton_projected.forward_chunked}.get(path, triton_projected.forward)
            return fwd(base, source, weights, basis, reflect, u, m, m_stride, mask is not None)
    cfg = _config(base, T, B, d, None if basis is None else basis.shape[1], S)
    if basis is None:
        out = torch.empty_like(base)
        grid = (triton.cdiv(T, cfg["BT2"]), triton.cdiv(d, cfg["DSPAN2"]), B)
        _mix_kernel[grid](base, source, weights, out, T, S, d, cfg["DSPAN2"],
                          IEEE=_ieee(base), BT=cfg["BT2"], BD=min(cfg["BD2"], cfg["DSPAN2"]), BS=cfg["BS"],
                          num_warps=cfg["W2"])
        return out
    c, vd, _, _, _ = _launch_coords(base, source, weights, basis, reflect, cfg)
    return _launch_apply(base, torch.empty_like(base), c, vd, mask, basis, reflect, u, cfg)


def _forward_train(base, source, weights, basis, reflect, mask):
    """The projected forward for a call that needs a gradient: (out, P_S, P_B), the two
    projections the projected backward would otherwise compute again."""
    B = base.shape[0]
    basis = basis.contiguous()
    reflect = reflect.contiguous() if reflect is not None else None
    m, m_stride = _expanded_mask(mask, B, basis.shape[1], base.device)
    return triton_projected.forward(base.contiguous(), source.contiguous(), weights.contiguous(), basis, reflect,
                                    _u(basis, reflect), m, m_stride, mask is not None, keep_projections=True)


def _backward(grad, base, source, weights, basis, reflect, mask, ps=None, pb=None, need_base=True,
              need_source=True):
    B, T, d = base.shape
    S = source.shape[1]
    dev = base.device
    grad = grad.contiguous()
    base = base.contiguous()
    source = source.contiguous()
    weights = weights.contiguous()
    def empty():  # a fresh tensor per absent input: custom-op outputs may not alias
        return torch.empty(0, device=dev, dtype=base.dtype)

    if basis is not None:
        basis = basis.contiguous()
        reflect = reflect.contiguous() if reflect is not None else None
        k = basis.shape[1]
        u = _u(basis, reflect)
        if triton_projected.soft_path(B, T, d, k, backward=True) != "fused":  # onepass: the projected one
            m, m_stride = _expanded_mask(mask, B, k, dev)
            grads = triton_projected.backward(grad, base, source, weights, basis, reflect, mask, u, m, m_stride,
                                              ps, pb, need_base, need_source)
            return tuple(empty() if gr is None else gr for gr in grads)
    cfg = _config(base, T, B, d, None if basis is None else basis.shape[1], S)
    g_base = torch.empty_like(base)
    g_w = torch.empty(B, S + 1, T, device=dev, dtype=torch.float32)
    dummy = torch.empty(1, device=dev, dtype=torch.float32)
    grid = (triton.cdiv(T, cfg["BT3"]), triton.cdiv(S, cfg["BS"]), B)
    if basis is None:
        _bwd_delta_kernel[grid](
            grad, base, source, weights, dummy, dummy, dummy, dummy, g_base, g_w,
            T, S, d, 1,
            HAS_BASIS=False, HAS_REFLECT=False, IEEE=_ieee(base), ONE_K=True,
            BT=cfg["BT3"], BK=16, BD=cfg["BD3"], BS=cfg["BS"], num_warps=cfg["W3"],
        )
        # g_source = w_src @ g (reduction over t: a batched GEMM, cuBLAS)
        g_source = torch.bmm(weights[:, :S, :], grad)
        return g_base, g_source, g_w.to(base.dtype), empty(), empty(), empty()

    c, vd, ge, vg, delta = _launch_coords(base, source, weights, basis, reflect, cfg,
                                          grad=grad, store_delta=True)
    # Small [B*T, k] work in torch: sums of the d-split partials, the reflection correction
    # (c = R^T delta - 2 (v.delta) u, g_e likewise), g_mask, g_c = m g_e, u.g_c, u.e.
    c3 = c.sum(0).view(B, T, k)
    ge3 = ge.sum(0).view(B, T, k)
    # The d-split partials can be [DSPLIT, B*T, k] fp32, as large as base itself at B*T = 1024
    # on an H200: free them before the [B, T, d] gradients are allocated.
    del c, ge
    if reflect is not None:
        vd = vd.sum(0)
        vg = vg.sum(0)
        c3 = c3 - 2.0 * vd.view(B, T, 1) * u.unsqueeze(1)
        ge3 = ge3 - 2.0 * vg.view(B, T, 1) * u.unsqueeze(1)
    if mask is None:
        g_mask = empty()
        gc3 = ge3
        e3 = c3
    else:
        mf = mask.float()
        mb = mf.unsqueeze(1) if mask.dim() == 2 else mf
        prod = ge3 * c3
        g_mask = (prod.sum(1) if mask.dim() == 2 else prod.sum((0, 1))).to(mask.dtype)
        gc3 = ge3 * mb
        e3 = c3 * mb
    gc3 = gc3.contiguous()
    if reflect is not None:
        ugc = (gc3 * u.unsqueeze(1)).sum(-1).contiguous()  # [B, T]
        ue = (e3 * u.unsqueeze(1)).sum(-1)  # [B, T]
    else:
        ugc = dummy
    _bwd_delta_kernel[grid](
        grad, base, source, weights, basis, reflect if reflect is not None else dummy,
        gc3, ugc, g_base, g_w,
        T, S, d, k,
        HAS_BASIS=True, HAS_REFLECT=reflect is not None, IEEE=_ieee(base), ONE_K=k <= cfg["BK"],
        BT=cfg["BT3"], BK=cfg["BK"], BD=cfg["BD3"], BS=cfg["BS"], num_warps=cfg["W3"],
    )
    dt = base.dtype
    # g_source = w_src g_delta with g_delta = g_c R^T - 2 (u.g_c) v, from its low-rank
    # factors: (w_src g_c) R^T - 2 (w_src (u.g_c)) v^T. The [B, T, d] g_delta is never
    # stored (one [B, T, d] buffer less at the backward's peak, and one write and read less).
    w_src = weights[:, :S, :].float()
    g_source = (torch.bmm(w_src, gc3).reshape(B * S, k).to(dt) @ basis.t()).view(B, S, d)
    if reflect is not None:
        g_source.baddbmm_(torch.bmm(w_src, ugc.unsqueeze(2)).to(dt), reflect.unsqueeze(1), alpha=-2.0)
    # g_basis = sum_bt (H g) e^T + (H delta) g_c^T, H = I - 2 v v^T:
    #   G^T E + Delta^T G_c - 2 sum_b v_b y_b^T,  y_b = sum_t (v.g) e + (v.delta) g_c.
    # Reductions over all B*T tokens with [d, k] outputs: torch mm (cuBLAS), fp32 accumulate.
    N = B * T
    e_t = e3.reshape(N, k).to(dt)
    gc_t = gc3.reshape(N, k).to(dt)
    g_basis = (grad.reshape(N, d).t() @ e_t).float() + (delta.reshape(N, d).t() @ gc_t).float()
    if reflect is not None:
        vg3 = vg.view(B, T, 1)
        vd3 = vd.view(B, T, 1)
        y = (vg3 * e3 + vd3 * gc3).sum(1)  # [B, k]
        g_basis = g_basis - 2.0 * reflect.float().t() @ y
        # g_reflect = -2 [sum_t (u.e) g + sum_t (u.g_c) delta + R y]: two bmm and one mm.
        g_reflect = -2.0 * (
            torch.bmm(ue.unsqueeze(1).to(dt), grad).squeeze(1).float()
            + torch.bmm(ugc.unsqueeze(1).to(dt), delta).squeeze(1).float()
            + y @ basis.float().t()
        )
        g_reflect = g_reflect.to(reflect.dtype)
    else:
        g_reflect = empty()
    return g_base, g_source, g_w.to(dt), g_basis.to(basis.dtype), g_reflect, g_mask


# --------------------------------------------------------------------------------------
# torch.library custom ops
# --------------------------------------------------------------------------------------


@torch.library.custom_op("hyperdas_fast::interchange_triton", mutates_args=())
def interchange_triton(
    base: Tensor, source: Tensor, weights: Tensor,
    basis: Optional[Tensor], reflect: Optional[Tensor], mask: Optional[Tensor],
) -> Tensor:
    return _forward(base, source, weights, basis, reflect, mask)


@interchange_triton.register_fake
def _(base, source, weights, basis, reflect, mask):
    return torch.empty_like(base, memory_format=torch.contiguous_format)


@torch.library.custom_op("hyperdas_fast::interchange_triton_train", mutates_args=())
def interchange_triton_train(
    base: Tensor, source: Tensor, weights: Tensor,
    basis: Tensor, reflect: Optional[Tensor], mask: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    """The forward when a gradient is needed and the backward takes the projected path:
    out, and the projections P_S [B*S, Kp] and P_B [B*T, Kp] (x R and the reflection
    column(s); ``triton_projected.projection_layout`` gives Kp and the dtype), which the
    backward reuses (two GEMMs over d fewer; a few MB kept)."""
    return _forward_train(base, source, weights, basis, reflect, mask)


@interchange_triton_train.register_fake
def _(base, source, weights, basis, reflect, mask):
    B, T, _ = base.shape
    kp, _, dtype = triton_projected.projection_layout(B, basis.shape[1], reflect is not None, base.dtype)
    return (torch.empty_like(base, memory_format=torch.contiguous_format),
            base.new_empty(B * source.shape[1], kp, dtype=dtype), base.new_empty(B * T, kp, dtype=dtype))


@torch.library.custom_op("hyperdas_fast::interchange_triton_backward", mutates_args=())
def interchange_triton_backward(
    grad: Tensor, base: Tensor, source: Tensor, weights: Tensor,
    basis: Optional[Tensor], reflect: Optional[Tensor], mask: Optional[Tensor],
    ps: Optional[Tensor] = None, pb: Optional[Tensor] = None, need_base: bool = True, need_source: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The six input gradients (an empty tensor for an absent input). need_base /
    need_source False: the projected path leaves out that [N, d] product (empty tensor)."""
    return _backward(grad, base, source, weights, basis, reflect, mask, ps, pb, need_base, need_source)


@interchange_triton_backward.register_fake
def _(grad, base, source, weights, basis, reflect, mask, ps=None, pb=None, need_base=True, need_source=True):
    def like(t, needed=True):
        if t is None:
            return base.new_empty(0)
        if not needed and basis is not None and triton_projected.soft_path(
                base.shape[0], base.shape[1], base.shape[2], basis.shape[1], backward=True) != "fused":
            return base.new_empty(0)
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    return (like(base, need_base), like(source, need_source), like(weights), like(basis), like(reflect),
            like(mask))


def _savable(t: Optional[Tensor]) -> Optional[Tensor]:
    """Inference tensors (hidden states computed under torch.inference_mode(), with a basis
    to train, say) cannot be saved for backward: a copy of those, as the C++ autograd of the
    cpp and cuda backends does, so that backend="auto" trains alike on either side of its
    size rule."""
    return t.clone() if t is not None and t.is_inference() else t


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*(_savable(t) for t in inputs))


def _input_grads(ctx, grad, inputs, ps=None, pb=None):
    """The gradients of the six inputs (None for an absent one, or one that needs none:
    base and source, hidden states of a frozen model, usually need none, and the projected
    backward then skips their [N, d] products)."""
    needs = ctx.needs_input_grad
    grads = interchange_triton_backward(grad, *inputs, ps, pb, bool(needs[0]), bool(needs[1]))
    return tuple(None if p is None or not need else gr for p, gr, need in zip(inputs, grads, needs))


def _autograd_backward(ctx, grad):
    return _input_grads(ctx, grad, ctx.saved_tensors)


torch.library.register_autograd(
    "hyperdas_fast::interchange_triton", _autograd_backward, setup_context=_setup_context
)


def _setup_context_train(ctx, inputs, output):
    _, ps, pb = output
    ctx.save_for_backward(*(_savable(t) for t in inputs), ps, pb)


def _autograd_backward_train(ctx, grad, _grad_ps, _grad_pb):
    # P_S and P_B never leave interchange_soft, so nothing flows back into them.
    *inputs, ps, pb = ctx.saved_tensors
    return _input_grads(ctx, grad, inputs, ps, pb)


torch.library.register_autograd(
    "hyperdas_fast::interchange_triton_train", _autograd_backward_train, setup_context=_setup_context_train
)


# --------------------------------------------------------------------------------------
# Backend entry points (see ops/__init__.py)
# --------------------------------------------------------------------------------------


def _interpreter_low_precision(t: Tensor) -> bool:
    # The Triton interpreter (CPU tensors) evaluates fp16/bf16 tl.dot wrongly: run those in
    # fp32 there and round the result back.
    return t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16)


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.float()


def _soft_op(base, source, weights, basis, reflect, mask) -> Tensor:
    """The train op where a gradient is needed and the backward takes the projected path
    (it keeps P_S and P_B for the backward), else the plain op (any forward path)."""
    args = (base, source, weights, basis, reflect, mask)
    if (basis is not None and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
            and triton_projected.soft_path(*base.shape, basis.shape[1], backward=True) == "projected"):
        return torch.ops.hyperdas_fast.interchange_triton_train(*args)[0]
    return torch.ops.hyperdas_fast.interchange_triton(*args)


def interchange_soft(base, source, weights, basis, reflect, mask) -> Tensor:
    if base.dtype not in _KERNEL_DTYPES:
        # float64: the kernels target fp32/fp16/bf16; the torch reference is exact enough.
        return interchange_reference(base, source, weights, basis, reflect, mask)
    if _interpreter_low_precision(base):
        args = [_f32(t) for t in (base, source, weights, basis, reflect, mask)]
        return _soft_op(*args).to(base.dtype)
    return _soft_op(base, source, weights, basis, reflect, mask)


def interchange_rows(base, source, batch_index, base_pos, source_pos, basis, reflect, mask, inplace) -> Tensor:
    out = base if inplace else base.clone(memory_format=torch.contiguous_format)
    if out.is_inference() and not torch.is_inference_mode_enabled():  # refused before anything is written
        raise RuntimeError("Inplace update to inference tensor outside InferenceMode is not allowed; "
                           "clone it first or call under torch.inference_mode()")
    if batch_index.numel() == 0:
        return out
    if basis is None:
        # Vanilla rows are a plain gather/scatter copy (torch index_put).
        out[batch_index, base_pos] = source[batch_index, source_pos]
        return out
    if base.dtype not in _KERNEL_DTYPES:
        # float64: the torch formula (the kernels target fp32/fp16/bf16).
        ref = interchange_rows_reference(base, source, batch_index, base_pos, source_pos, basis, reflect, mask)
        out[batch_index, base_pos] = ref[batch_index, base_pos]
        return out
    if _interpreter_low_precision(base):
        # contiguous: the row kernels write this copy in place as a contiguous [B, T, d]
        rows32 = interchange_rows(base.float().contiguous(), _f32(source), batch_index, base_pos, source_pos,
                                  _f32(basis), _f32(reflect), _f32(mask), True)
        out[batch_index, base_pos] = rows32[batch_index, base_pos].to(base.dtype)
        return out
    source = source.contiguous()
    basis = basis.contiguous()
    reflect = reflect.contiguous() if reflect is not None else None
    rows = (batch_index.long().contiguous(), base_pos.long().contiguous(), source_pos.long().contiguous())
    B, T, d = base.shape
    cfg = _config(out, rows[0].numel(), 1, d, basis.shape[1], source.shape[1])
    u = _u(basis, reflect)
    # The coords kernel reads the rows before the apply kernel writes them.
    c, vd, _, _, _ = _launch_coords(out, source, None, basis, reflect, cfg, rows=rows)
    _launch_apply(out, out, c, vd, mask, basis, reflect, u, cfg, rows=rows)
    if not out.is_inference():
        # What an in-place torch op does: autograd then refuses a backward through a graph
        # that saved base before the write, which the kernel made through a raw pointer.
        torch.autograd.graph.increment_version(out)
    return out


__all__ = ["ROWS_AUTOGRAD", "is_available", "interchange_soft", "interchange_rows"]
