"""Triton backend of the interchange op (soft form with autograd, hard rows form).

Math (HYPERDAS.md section 1), per token with R [d, k], v [d], u = R^T v, m [k]:

    delta = mix - base,  mix = sum_s w[s] source[s] + w[S] base
    c     = R^T delta - 2 (v.delta) u          (= R_b^T delta)
    e     = m * c
    out   = base + R e - 2 (u.e) v             (= base + R_b e)

Kernels (all accumulate in fp32; tl.dot runs on tensor cores for bf16/fp16 and with
``input_precision="ieee"`` for fp32 so results match torch's fp32 matmul, which does not
use TF32 by default):

- ``_coords_kernel``: a tile of BT rows x BK subspace columns; loops over d in BD chunks,
  builds the mix in-kernel from source tiles (tl.dot of w^T [BT, BS] and source [BS, BD]),
  accumulates delta @ R and v.delta -> c [rows, k] (fp32 scratch). In the backward it also
  accumulates g @ R and v.g -> g_e, and can store delta for the basis/reflect reductions.
  The same kernel serves the hard rows mode (ROWS=True): rows are gathered by
  (batch_index, base_pos, source_pos) and delta = source row - base row.
- ``_apply_kernel``: out = base + e R^T - 2 (e.u) v for a tile of rows and a span of d.
  In rows mode out aliases base (in place) or its clone; rows are unique so each element
  is read and written by one program only.
- ``_bwd_delta_kernel``: g_delta = R g_c - 2 (u.g_c) v, g_base = g - (1 - w_self) g_delta,
  g_w[b, s, t] = <g_delta, source[s]> (tl.dot) and g_w[b, S, t] = <g_delta, base>.

Done with torch ops (small or GEMM-shaped reductions where cuBLAS is as good as a custom
kernel; each is commented where it happens): u = R^T v, g_mask, g_c = m g_e, u.g_c,
g_source = w_src @ g_delta (bmm), g_basis (two [d, N] x [N, k] mm plus a rank-B term),
g_reflect (two bmm plus a [B, k] x [k, d] mm), vanilla rows (an index copy), float64
inputs (the torch reference: the kernels are written for fp32/fp16/bf16).

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
    base_ptr, src_ptr, w_ptr, R_ptr, v_ptr, u_ptr,
    c_ptr, vd_ptr,
    g_ptr, ge_ptr, vg_ptr, delta_ptr,
    bidx_ptr, tpos_ptr, spos_ptr,
    T, S, d, k, P,
    ROWS: tl.constexpr, HAS_REFLECT: tl.constexpr, HAS_GRAD: tl.constexpr,
    STORE_DELTA: tl.constexpr, IEEE: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    pid_k = tl.program_id(1)
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

    for d0 in range(0, d, BD):
        dcols = d0 + tl.arange(0, BD)
        dvalid = dcols < d
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

    mk = valid[:, None] & kvalid[None, :]
    if HAS_REFLECT:
        ut = tl.load(u_ptr + brow[:, None] * k + kcols[None, :], mask=mk, other=0.0)
        acc = acc - 2.0 * vd[:, None] * ut
        tl.store(vd_ptr + rid, vd, mask=valid & first_k)
        if HAS_GRAD:
            acc_g = acc_g - 2.0 * vg[:, None] * ut
            tl.store(vg_ptr + rid, vg, mask=valid & first_k)
    tl.store(c_ptr + rid[:, None] * k + kcols[None, :], acc, mask=mk)
    if HAS_GRAD:
        tl.store(ge_ptr + rid[:, None] * k + kcols[None, :], acc_g, mask=mk)


@triton.jit
def _apply_kernel(
    base_ptr, out_ptr, c_ptr, m_ptr, m_stride_b, R_ptr, v_ptr, u_ptr,
    bidx_ptr, tpos_ptr, spos_ptr,
    T, S, d, k, P, DSPAN,
    ROWS: tl.constexpr, HAS_REFLECT: tl.constexpr, HAS_MASK: tl.constexpr,
    IEEE: tl.constexpr, ONE_K: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rid, brow, trow, base_off, src_off, valid = _row_offsets(
        pid_tile, pid_b, bidx_ptr, tpos_ptr, spos_ptr, T, S, d, P, ROWS, BT)

    # e = m * c and e.u for the rows (e.u needs all k columns)
    eu = tl.zeros([BT], dtype=tl.float32)
    for k0 in range(0, k, BK):
        kcols = k0 + tl.arange(0, BK)
        mk = valid[:, None] & (kcols < k)[None, :]
        e = tl.load(c_ptr + rid[:, None] * k + kcols[None, :], mask=mk, other=0.0)
        if HAS_MASK:
            e = e * tl.load(m_ptr + brow[:, None] * m_stride_b + kcols[None, :], mask=mk, other=0.0).to(tl.float32)
        if HAS_REFLECT:
            eu += tl.sum(e * tl.load(u_ptr + brow[:, None] * k + kcols[None, :], mask=mk, other=0.0), axis=1)
    if ONE_K:
        kcols1 = tl.arange(0, BK)
        mk1 = valid[:, None] & (kcols1 < k)[None, :]
        e1 = tl.load(c_ptr + rid[:, None] * k + kcols1[None, :], mask=mk1, other=0.0)
        if HAS_MASK:
            e1 = e1 * tl.load(m_ptr + brow[:, None] * m_stride_b + kcols1[None, :], mask=mk1, other=0.0).to(tl.float32)
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
                mk = valid[:, None] & kvalid[None, :]
                e = tl.load(c_ptr + rid[:, None] * k + kcols[None, :], mask=mk, other=0.0)
                if HAS_MASK:
                    e = e * tl.load(m_ptr + brow[:, None] * m_stride_b + kcols[None, :], mask=mk, other=0.0).to(tl.float32)
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
    gbase_ptr, gdelta_ptr, gw_ptr,
    T, S, d, k,
    HAS_BASIS: tl.constexpr, HAS_REFLECT: tl.constexpr, IEEE: tl.constexpr, ONE_K: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
):
    """Per (token tile, source chunk, batch): loops over d.

    g_delta = R g_c - 2 (u.g_c) v  (g_delta = g without a basis)
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
            tl.store(gdelta_ptr + row_off[:, None] + dcols[None, :],
                     gd.to(gdelta_ptr.dtype.element_ty), mask=m2 & first_s[:, None])
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
    """Block sizes. The interpreter wants few, small programs; the GPU wants enough CTAs to
    fill every SM (the coords kernel cannot split d without atomics, so BT shrinks to 16
    when there are few token tiles)."""
    if _interpreting(x):
        return dict(BT=16, BK=_p2(k or 16, 16, 32), BD=32, BS=16, warps=1, DSPAN=_p2(d, 32, 64))
    sms = _num_sms(x.device)
    BT = 32 if triton.cdiv(rows_per_batch, 32) * batches >= 2 * sms else 16
    BK = _p2(k or 16, 16, 128)
    BS = _p2(S, 16, 64)
    BD = 64 if BK >= 128 else 128
    ntiles = triton.cdiv(rows_per_batch, BT) * batches
    # apply kernel: split d so that there are >= 4 programs per SM
    nsplit = max(1, min(triton.cdiv(d, 128), triton.cdiv(4 * sms, max(ntiles, 1))))
    DSPAN = triton.cdiv(triton.cdiv(d, nsplit), 128) * 128
    return dict(BT=BT, BK=BK, BD=BD, BS=BS, warps=4, DSPAN=DSPAN)


def _ieee(x: Tensor) -> bool:
    return x.dtype == torch.float32


def _expanded_mask(mask: Optional[Tensor], batch: int, k: int, device) -> Tuple[Tensor, int]:
    if mask is None:
        return torch.empty(1, device=device, dtype=torch.float32), 0
    mask = mask.contiguous()
    return mask, (k if mask.dim() == 2 else 0)


def _u(basis: Tensor, reflect: Optional[Tensor]) -> Tensor:
    # u = R^T v: [B, k], a tiny GEMM done by torch in fp32.
    if reflect is None:
        return torch.empty(1, device=basis.device, dtype=torch.float32)
    return (reflect.float() @ basis.float()).contiguous()


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _launch_coords(base, source, weights, basis, reflect, u, cfg, grad=None, store_delta=False,
                   rows=None):
    """Returns c [rows, k] fp32, v.delta [rows] fp32, and with grad: g_e, v.g, delta."""
    B, T, d = base.shape
    S = source.shape[1]
    k = basis.shape[1]
    dev = base.device
    if rows is None:
        nrows, P = B * T, 0
        bidx = tpos = spos = torch.empty(1, device=dev, dtype=torch.int64)
        grid = (triton.cdiv(T, cfg["BT"]), triton.cdiv(k, cfg["BK"]), B)
    else:
        bidx, tpos, spos = rows
        P = nrows = bidx.numel()
        grid = (triton.cdiv(P, cfg["BT"]), triton.cdiv(k, cfg["BK"]), 1)
    f32 = dict(device=dev, dtype=torch.float32)
    c = torch.empty(nrows, k, **f32)
    vd = torch.empty(nrows if reflect is not None else 1, **f32)
    dummy = torch.empty(1, **f32)
    ge = torch.empty(nrows, k, **f32) if grad is not None else dummy
    vg = torch.empty(nrows if (grad is not None and reflect is not None) else 1, **f32)
    delta = torch.empty_like(base) if store_delta else dummy
    _coords_kernel[grid](
        base, source, weights if weights is not None else dummy, basis,
        reflect if reflect is not None else dummy, u,
        c, vd, grad if grad is not None else dummy, ge, vg, delta,
        bidx, tpos, spos,
        T, S, d, k, P,
        ROWS=rows is not None, HAS_REFLECT=reflect is not None, HAS_GRAD=grad is not None,
        STORE_DELTA=store_delta, IEEE=_ieee(base),
        BT=cfg["BT"], BK=cfg["BK"], BD=cfg["BD"], BS=cfg["BS"], num_warps=cfg["warps"],
    )
    return c, vd, ge, vg, delta


def _launch_apply(base, out, c, mask, basis, reflect, u, cfg, rows=None):
    B, T, d = base.shape
    k = basis.shape[1]
    dev = base.device
    m, m_stride = _expanded_mask(mask, B, k, dev)
    if rows is None:
        P = 0
        bidx = tpos = spos = torch.empty(1, device=dev, dtype=torch.int64)
        ntile, nb = triton.cdiv(T, cfg["BT"]), B
    else:
        bidx, tpos, spos = rows
        P = bidx.numel()
        ntile, nb = triton.cdiv(P, cfg["BT"]), 1
    BDa = min(cfg["DSPAN"], 64 if _interpreting(base) else 128)
    DSPAN = cfg["DSPAN"]
    grid = (ntile, triton.cdiv(d, DSPAN), nb)
    dummy = torch.empty(1, device=dev, dtype=torch.float32)
    _apply_kernel[grid](
        base, out, c, m, m_stride, basis, reflect if reflect is not None else dummy, u,
        bidx, tpos, spos,
        T, 0, d, k, P, DSPAN,
        ROWS=rows is not None, HAS_REFLECT=reflect is not None, HAS_MASK=mask is not None,
        IEEE=_ieee(base), ONE_K=k <= cfg["BK"],
        BT=cfg["BT"], BK=cfg["BK"], BD=BDa, num_warps=cfg["warps"],
    )
    return out


def _forward(base, source, weights, basis, reflect, mask) -> Tensor:
    B, T, d = base.shape
    S = source.shape[1]
    base = base.contiguous()
    source = source.contiguous()
    weights = weights.contiguous()
    out = torch.empty_like(base)
    if basis is None:
        cfg = _config(base, T, B, d, None, S)
        BD = min(cfg["DSPAN"], 64 if _interpreting(base) else 128)
        grid = (triton.cdiv(T, cfg["BT"]), triton.cdiv(d, cfg["DSPAN"]), B)
        _mix_kernel[grid](base, source, weights, out, T, S, d, cfg["DSPAN"],
                          IEEE=_ieee(base), BT=cfg["BT"], BD=BD, BS=cfg["BS"], num_warps=cfg["warps"])
        return out
    basis = basis.contiguous()
    reflect = reflect.contiguous() if reflect is not None else None
    cfg = _config(base, T, B, d, basis.shape[1], S)
    u = _u(basis, reflect)
    c, _, _, _, _ = _launch_coords(base, source, weights, basis, reflect, u, cfg)
    return _launch_apply(base, out, c, mask, basis, reflect, u, cfg)


def _backward(grad, base, source, weights, basis, reflect, mask):
    B, T, d = base.shape
    S = source.shape[1]
    dev = base.device
    grad = grad.contiguous()
    base = base.contiguous()
    source = source.contiguous()
    weights = weights.contiguous()
    def empty():  # a fresh tensor per absent input: custom-op outputs may not alias
        return torch.empty(0, device=dev, dtype=base.dtype)

    cfg = _config(base, T, B, d, None if basis is None else basis.shape[1], S)
    g_base = torch.empty_like(base)
    g_w = torch.empty(B, S + 1, T, device=dev, dtype=torch.float32)
    dummy = torch.empty(1, device=dev, dtype=torch.float32)
    grid = (triton.cdiv(T, cfg["BT"]), triton.cdiv(S, cfg["BS"]), B)
    if basis is None:
        _bwd_delta_kernel[grid](
            grad, base, source, weights, dummy, dummy, dummy, dummy, g_base, dummy, g_w,
            T, S, d, 1,
            HAS_BASIS=False, HAS_REFLECT=False, IEEE=_ieee(base), ONE_K=True,
            BT=cfg["BT"], BK=16, BD=cfg["BD"], BS=cfg["BS"], num_warps=cfg["warps"],
        )
        # g_source = w_src @ g (reduction over t: a batched GEMM, cuBLAS)
        g_source = torch.bmm(weights[:, :S, :], grad)
        return g_base, g_source, g_w.to(base.dtype), empty(), empty(), empty()

    basis = basis.contiguous()
    reflect = reflect.contiguous() if reflect is not None else None
    k = basis.shape[1]
    u = _u(basis, reflect)
    c, vd, ge, vg, delta = _launch_coords(base, source, weights, basis, reflect, u, cfg,
                                          grad=grad, store_delta=True)
    # Small [B*T, k] elementwise work and reductions in torch: g_mask, g_c = m g_e, u.g_c.
    c3 = c.view(B, T, k)
    ge3 = ge.view(B, T, k)
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
    g_delta = torch.empty_like(base)
    _bwd_delta_kernel[grid](
        grad, base, source, weights, basis, reflect if reflect is not None else dummy,
        gc3, ugc, g_base, g_delta, g_w,
        T, S, d, k,
        HAS_BASIS=True, HAS_REFLECT=reflect is not None, IEEE=_ieee(base), ONE_K=k <= cfg["BK"],
        BT=cfg["BT"], BK=cfg["BK"], BD=cfg["BD"], BS=cfg["BS"], num_warps=cfg["warps"],
    )
    dt = base.dtype
    # g_source = w_src @ g_delta: reduction over tokens, a batched GEMM (cuBLAS).
    g_source = torch.bmm(weights[:, :S, :], g_delta)
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


@torch.library.custom_op("hyperdas_fast::interchange_triton_backward", mutates_args=())
def interchange_triton_backward(
    grad: Tensor, base: Tensor, source: Tensor, weights: Tensor,
    basis: Optional[Tensor], reflect: Optional[Tensor], mask: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward(grad, base, source, weights, basis, reflect, mask)


@interchange_triton_backward.register_fake
def _(grad, base, source, weights, basis, reflect, mask):
    def like(t):
        if t is None:
            return base.new_empty(0)
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    return like(base), like(source), like(weights), like(basis), like(reflect), like(mask)


def _setup_context(ctx, inputs, output):
    base, source, weights, basis, reflect, mask = inputs
    ctx.save_for_backward(base, source, weights, basis, reflect, mask)


def _autograd_backward(ctx, grad):
    base, source, weights, basis, reflect, mask = ctx.saved_tensors
    grads = interchange_triton_backward(grad, base, source, weights, basis, reflect, mask)
    present = (base, source, weights, basis, reflect, mask)
    return tuple(None if p is None else gr for p, gr in zip(present, grads))


torch.library.register_autograd(
    "hyperdas_fast::interchange_triton", _autograd_backward, setup_context=_setup_context
)


# --------------------------------------------------------------------------------------
# Backend entry points (see ops/__init__.py)
# --------------------------------------------------------------------------------------


def interchange_soft(base, source, weights, basis, reflect, mask) -> Tensor:
    if base.dtype not in _KERNEL_DTYPES:
        # float64: the kernels target fp32/fp16/bf16; the torch reference is exact enough.
        return interchange_reference(base, source, weights, basis, reflect, mask)
    return torch.ops.hyperdas_fast.interchange_triton(base, source, weights, basis, reflect, mask)


def interchange_rows(base, source, batch_index, base_pos, source_pos, basis, reflect, mask, inplace) -> Tensor:
    out = base if inplace else base.clone(memory_format=torch.contiguous_format)
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
    source = source.contiguous()
    basis = basis.contiguous()
    reflect = reflect.contiguous() if reflect is not None else None
    rows = (batch_index.long().contiguous(), base_pos.long().contiguous(), source_pos.long().contiguous())
    B, T, d = base.shape
    cfg = _config(out, rows[0].numel(), 1, d, basis.shape[1], source.shape[1])
    u = _u(basis, reflect)
    # The coords kernel reads the rows before the apply kernel writes them.
    c, _, _, _, _ = _launch_coords(out, source, None, basis, reflect, u, cfg, rows=rows)
    _launch_apply(out, out, c, mask, basis, reflect, u, cfg, rows=rows)
    return out


__all__ = ["ROWS_AUTOGRAD", "is_available", "interchange_soft", "interchange_rows"]
