"""The Triton backend's "projected" soft path: cuBLAS GEMMs over d (the projections), and
Triton kernels for everything in k dimensions and for the output (the backward at every
size, the forward from B*T*d = 2^19; see ``soft_path``).

Same algebra as ``csrc/common/interchange_projected.h`` (the CUDA backend's ATen version;
its comment derives it): the mix is never formed in d dimensions, because projecting
commutes with mixing. Where the ATen version runs 9 (forward) and 24 (backward) small
elementwise ops and reductions on [B, T, k] tensors besides its GEMMs (each a kernel launch
of a few microseconds on a GPU; benchmarks/count_kernels.py counts them), this path runs
one Triton kernel per pass for them (two in the backward).

With RV = [R | -2 v_1 .. -2 v_B] ([d, Kc], Kc = k + B; just R without reflect) and, for a
row x in k dimensions of batch b, block(x) = [x | (u.x) in column k + b, zeros elsewhere]:

    P_S = source RV [B, S, Kc],  P_B = base RV [B, T, Kc]              (GEMMs over d)
    c   = R_b^T delta = W_src^T P_S[:k] + (w_self - 1) P_B[:k] - 2 (v.delta) u
    e   = m c
    out = base + block(e) RV^T                                         (GEMM, beta = 1)

and in the backward, with P_G = g RV, g_e = R_b^T g, g_c = m g_e, g_s = W_src g_c:

    g_base   = g + block((w_self - 1) g_c) RV^T
    g_source = block(g_s) RV^T
    g_w[s,t] = g_c,t . (R_b^T source_s),   g_w[S,t] = g_c,t . (R_b^T base_t)
    [g_R | sum_t (u.e) g + (u.g_c) delta]  = g^T block(e) + source^T block(g_s) + base^T block((w_self-1) g_c)
    g_basis  = g_R[:, :k] - 2 V^T y,   y_b = sum_t (v.g) e + (v.delta) g_c
    g_v      = -2 [g_R[:, k + b] + R y_b]

RV's reflection columns hold -2 v rather than v, so block(.) is the same matrix in the
output GEMMs (where the rank-one terms carry -2) and in the g_R GEMMs (where they do not);
the kernels read v.x from a P column times -1/2, which is exact (a power of two).

Kernels (fp32 arithmetic; the k-space products use ``input_precision="ieee"`` for fp32
inputs, as torch's fp32 matmul does, and tf32 for bf16/fp16 inputs, see ``_precision``):

- ``_kspace_rows_kernel`` (BT rows of one batch): c, e and block(e); in the backward also
  g_c, u.g_c, g_w[S, :], block((w_self - 1) g_c), and per-tile partial sums of y and of
  g_mask (summed by torch afterwards: deterministic, no atomics).
- ``_kspace_sources_kernel`` (backward, BS sources of one batch): g_s = W_src g_c,
  block(g_s) and g_w[:S, :].
- ``_add_product_kernel``: out = x + A RV^T, the output (x = base, A = block(e)) and g_base
  (x = grad), in one pass over x (torch's addmm copies x into its result first).
- ``_project_kernel`` (opt-in, HYPERDAS_FAST_TRITON_PROJECTION=triton; its GPU tests pass on
  an H200, but no GPU has timed it): the projections themselves, [x R | -2 v_b . x] in fp32 for tiles of one example's
  rows, d split over several programs, in place of cuBLAS's x RV (see ``projection_method``).
- ``_onepass_forward_kernel`` (the experimental "onepass" forward): P_B, the rows
  kernel's k-space step and the output for BT rows in one program, so base is read once
  from memory (the second pass over the same rows should hit the L2).

With a gradient needed, the forward keeps P_S and P_B for the backward
(``forward(..., keep_projections=True)``, the op ``interchange_triton_train``), which then
projects only grad.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

ENV_PATH = "HYPERDAS_FAST_TRITON_SOFT"
MAX_K = 512  # the kernels hold a row's k columns in one block


@triton.jit
def _tile(n, k, BN: tl.constexpr, BK: tl.constexpr):
    """This program's tile: BN of the n rows (or sources) of batch b = program_id(1), and
    the k columns of one block, with their validity masks."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    idx = pid * BN + tl.arange(0, BN)
    kcols = tl.arange(0, BK)
    return pid, b, idx, idx < n, kcols, kcols < k


@triton.jit
def _store_block(ptr, row_off, x, xu, b, kcols, valid, k, B,
                 HAS_REFLECT: tl.constexpr, BB: tl.constexpr):
    """Rows [x | xu in column k + b, zeros in the other B - 1 columns] at ptr + row_off."""
    tl.store(ptr + row_off[:, None] + kcols[None, :], x.to(ptr.dtype.element_ty),
             mask=valid[:, None] & (kcols < k)[None, :])
    if HAS_REFLECT:
        for j0 in range(0, B, BB):
            jc = j0 + tl.arange(0, BB)
            vals = tl.where(jc[None, :] == b, xu[:, None], 0.0)
            tl.store(ptr + row_off[:, None] + k + jc[None, :], vals.to(ptr.dtype.element_ty),
                     mask=valid[:, None] & (jc < B)[None, :])


@triton.jit
def _project_chunk(x_rows, rvalid, dcols, dvalid, r_ptr, v_b, kcols, kvalid, k, acc, xv,
                   HAS_REFLECT: tl.constexpr, IEEE: tl.constexpr, V_DOT: tl.constexpr):
    """acc += x R and xv += x [v | 0 ...] over one chunk of d (dcols) for rows starting at
    the pointers x_rows (row stride d: dcols index into a row), R [d, k], v_b one example's
    v; xv [rows, 16] holds x . v in its column 0 (its sum over columns). V_DOT (bf16/fp16
    only): x . v as a second, narrow tensor-core product rather than x upcast and multiplied
    on the CUDA cores, which keeps an fp32 copy of the x tile live beside the accumulator.
    Compiled for sm_90 (ptxas, k = 128), that took the projection kernel's 64 x 64 tiles with
    4 warps from 152 bytes of stack to 16, and 128 x 64 with 8 warps from 88 to 0; in the
    onepass kernel it went the other way (32 x 64, 8 warps: no stack before, 24 with it), so
    that kernel keeps the CUDA-core product."""
    x = tl.load(x_rows[:, None] + dcols[None, :], mask=rvalid[:, None] & dvalid[None, :], other=0.0)
    r = tl.load(r_ptr + dcols[:, None] * k + kcols[None, :], mask=dvalid[:, None] & kvalid[None, :], other=0.0)
    if IEEE:
        acc = tl.dot(x, r, acc, input_precision="ieee")
    else:
        acc = tl.dot(x, r, acc)
    if HAS_REFLECT:
        if IEEE or not V_DOT:  # (fp32: the product on the FMA units spilled 1448 bytes of stack)
            vt = tl.load(v_b + dcols, mask=dvalid, other=0.0).to(tl.float32)
            part = tl.sum(x.to(tl.float32) * vt[None, :], axis=1)
            xv += tl.where(tl.arange(0, 16)[None, :] == 0, part[:, None], 0.0)
        else:
            vt = tl.load(v_b + dcols, mask=dvalid, other=0.0).to(x.dtype)
            vmat = tl.where(tl.arange(0, 16)[None, :] == 0, vt[:, None], tl.zeros_like(vt)[:, None])  # [BD, 16]
            xv = tl.dot(x, vmat, xv)
    return acc, xv


@triton.jit
def _coords_from_projections(ps_ptr, w_b, pb, bv, u_ptr, m_ptr, m_stride_b, b, t, valid, kcols, kvalid,
                             S, T, k, Kp, VSTEP, HAS_REFLECT: tl.constexpr, HAS_MASK: tl.constexpr,
                             BT: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr):
    """For BT rows t of batch b, from P_S (global, [B*S, Kp]) and the rows' pb = R^T base
    [BT, BK] and bv = v.base [BT]: c = R^T delta - 2 (v.delta) u, e = m c, u.e, v.delta and
    w_self - 1 (all fp32). R^T delta = W_src^T P_S + (w_self - 1) pb; P_S's column
    k + b * VSTEP holds -2 v.source (see ``projection_layout``)."""
    wm1 = tl.load(w_b + S * T + t, mask=valid, other=1.0).to(tl.float32) - 1.0
    acc = tl.zeros([BT, BK], dtype=tl.float32)
    vd = tl.zeros([BT], dtype=tl.float32)
    for s0 in range(0, S, BS):
        scols = s0 + tl.arange(0, BS)
        svalid = scols < S
        wt = tl.load(w_b + scols[None, :] * T + t[:, None],
                     mask=valid[:, None] & svalid[None, :], other=0.0).to(tl.float32)  # [BT, BS]
        ps = tl.load(ps_ptr + (b * S + scols[:, None]) * Kp + kcols[None, :],
                     mask=svalid[:, None] & kvalid[None, :], other=0.0).to(tl.float32)  # [BS, BK]
        acc = tl.dot(wt, ps, acc, input_precision=PREC)
        if HAS_REFLECT:
            sv = tl.load(ps_ptr + (b * S + scols) * Kp + k + b * VSTEP, mask=svalid, other=0.0).to(tl.float32)
            vd += tl.sum(wt * sv[None, :], axis=1)
    c = acc + wm1[:, None] * pb
    if HAS_REFLECT:
        u = tl.load(u_ptr + b * k + kcols, mask=kvalid, other=0.0)
        vd = -0.5 * vd + wm1 * bv
        c = c - 2.0 * vd[:, None] * u[None, :]
    if HAS_MASK:
        e = c * tl.load(m_ptr + b * m_stride_b + kcols, mask=kvalid, other=0.0).to(tl.float32)[None, :]
    else:
        e = c
    if HAS_REFLECT:
        ue = tl.sum(e * u[None, :], axis=1)
    else:
        ue = tl.zeros([BT], dtype=tl.float32)
    return c, e, ue, vd, wm1


@triton.jit
def _kspace_rows_kernel(
    ps_ptr, pb_ptr, pg_ptr, w_ptr, u_ptr, m_ptr, m_stride_b,
    blk_ptr, ag_ptr, gc_ptr, ugc_ptr, gw_ptr, y_ptr, gm_ptr,
    T, S, k, Kc, Kp, VSTEP, B, ntile,
    HAS_REFLECT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_GRAD: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr, BB: tl.constexpr, PREC: tl.constexpr,
):
    """One tile of BT rows of batch b. Forward: blk = block(e). Backward: blk =
    block((w_self - 1) g_c), ag = block(e), g_c, u.g_c, g_w[b, S, :], partials of y and
    of g_mask at [b, tile, :]."""
    pid_t, b, t, valid, kcols, kvalid = _tile(T, k, BT, BK)
    mk = valid[:, None] & kvalid[None, :]
    w_b = w_ptr + b * (S + 1) * T
    row_off = (b * T + t) * Kc  # the block outputs' rows
    p_off = (b * T + t) * Kp  # the projections' rows
    pb = tl.load(pb_ptr + p_off[:, None] + kcols[None, :], mask=mk, other=0.0).to(tl.float32)
    bv = tl.zeros([BT], dtype=tl.float32)
    if HAS_REFLECT:
        u = tl.load(u_ptr + b * k + kcols, mask=kvalid, other=0.0)
        bv = tl.load(pb_ptr + p_off + k + b * VSTEP, mask=valid, other=0.0).to(tl.float32) * -0.5
    if HAS_MASK:
        m = tl.load(m_ptr + b * m_stride_b + kcols, mask=kvalid, other=0.0).to(tl.float32)
    c, e, ue, vd, wm1 = _coords_from_projections(ps_ptr, w_b, pb, bv, u_ptr, m_ptr, m_stride_b, b, t, valid,
                                                 kcols, kvalid, S, T, k, Kp, VSTEP, HAS_REFLECT, HAS_MASK, BT, BK, BS,
                                                 PREC)

    if not HAS_GRAD:
        _store_block(blk_ptr, row_off, e, ue, b, kcols, valid, k, B, HAS_REFLECT, BB)
    else:
        ge = tl.load(pg_ptr + p_off[:, None] + kcols[None, :], mask=mk, other=0.0).to(tl.float32)
        cb = pb
        if HAS_REFLECT:
            vg = tl.load(pg_ptr + p_off + k + b * VSTEP, mask=valid, other=0.0).to(tl.float32) * -0.5
            ge = ge - 2.0 * vg[:, None] * u[None, :]
            cb = pb - 2.0 * bv[:, None] * u[None, :]
        part = (b * ntile + pid_t) * k + kcols
        if HAS_MASK:
            tl.store(gm_ptr + part, tl.sum(ge * c, axis=0), mask=kvalid)
            gc = ge * m[None, :]
        else:
            gc = ge
        tl.store(gc_ptr + (b * T + t)[:, None] * k + kcols[None, :], gc, mask=mk)
        tl.store(gw_ptr + b * (S + 1) * T + S * T + t, tl.sum(cb * gc, axis=1), mask=valid)
        if HAS_REFLECT:
            ugc = tl.sum(gc * u[None, :], axis=1)
            tl.store(ugc_ptr + b * T + t, ugc, mask=valid)
            tl.store(y_ptr + part, tl.sum(vg[:, None] * e + vd[:, None] * gc, axis=0), mask=kvalid)
        else:
            ugc = tl.zeros([BT], dtype=tl.float32)
        _store_block(blk_ptr, row_off, wm1[:, None] * gc, wm1 * ugc, b, kcols, valid, k, B, HAS_REFLECT, BB)
        _store_block(ag_ptr, row_off, e, ue, b, kcols, valid, k, B, HAS_REFLECT, BB)


@triton.jit
def _onepass_forward_kernel(
    base_ptr, out_ptr, ps_ptr, w_ptr, R_ptr, v_ptr, u_ptr, m_ptr, m_stride_b,
    T, S, d, k, Kc,
    HAS_REFLECT: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr,
):
    """The forward for BT rows of batch b in one program, reading base once from memory:
    pass 1 over d: pb = R^T base, bv = v.base; then c, e (k dimensions, from P_S); pass 2
    over d: out = base + R e - 2 (u.e) v, re-reading the same base rows (from L2)."""
    pid_t, b, t, valid, kcols, kvalid = _tile(T, k, BT, BK)
    row_off = (b * T + t) * d
    pb = tl.zeros([BT, BK], dtype=tl.float32)
    bv16 = tl.zeros([BT, 16], dtype=tl.float32)
    for d0 in range(0, d, BD):
        dcols = d0 + tl.arange(0, BD)
        pb, bv16 = _project_chunk(base_ptr + row_off, valid, dcols, dcols < d, R_ptr, v_ptr + b * d, kcols, kvalid, k,
                                  pb, bv16, HAS_REFLECT, IEEE, False)
    bv = tl.sum(bv16, axis=1)
    w_b = w_ptr + b * (S + 1) * T
    c, e, ue, vd, wm1 = _coords_from_projections(ps_ptr, w_b, pb, bv, u_ptr, m_ptr, m_stride_b, b, t, valid,
                                                 kcols, kvalid, S, T, k, Kc, 1, HAS_REFLECT, HAS_MASK, BT, BK, BS,
                                                 PREC)
    if not IEEE:
        e = e.to(R_ptr.dtype.element_ty)
    for d0 in range(0, d, BD):
        dcols = d0 + tl.arange(0, BD)
        dvalid = dcols < d
        m2 = valid[:, None] & dvalid[None, :]
        rT = tl.load(R_ptr + dcols[None, :] * k + kcols[:, None], mask=kvalid[:, None] & dvalid[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(e, rT, input_precision="ieee")
        else:
            acc = tl.dot(e, rT)
        res = tl.load(base_ptr + row_off[:, None] + dcols[None, :], mask=m2, other=0.0).to(tl.float32) + acc
        if HAS_REFLECT:
            vt = tl.load(v_ptr + b * d + dcols, mask=dvalid, other=0.0).to(tl.float32)
            res = res - 2.0 * ue[:, None] * vt[None, :]
        tl.store(out_ptr + row_off[:, None] + dcols[None, :], res.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _kspace_sources_kernel(
    ps_ptr, w_ptr, u_ptr, gc_ptr, ugc_ptr, as_ptr, gw_ptr,
    T, S, k, Kc, Kp, VSTEP, B,
    HAS_REFLECT: tl.constexpr,
    BS: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BB: tl.constexpr, PREC: tl.constexpr,
):
    """One tile of BS sources of batch b (backward): g_s = W_src g_c, block(g_s) (its u.g_s
    is W_src (u.g_c)), and g_w[b, s, t] = (R_b^T source_s) . g_c,t."""
    pid_s, b, s, svalid, kcols, kvalid = _tile(S, k, BS, BK)
    w_b = w_ptr + b * (S + 1) * T

    gs = tl.zeros([BS, BK], dtype=tl.float32)
    ugs = tl.zeros([BS], dtype=tl.float32)
    for t0 in range(0, T, BT):
        tc = t0 + tl.arange(0, BT)
        tvalid = tc < T
        w = tl.load(w_b + s[:, None] * T + tc[None, :],
                    mask=svalid[:, None] & tvalid[None, :], other=0.0).to(tl.float32)  # [BS, BT]
        gct = tl.load(gc_ptr + (b * T + tc)[:, None] * k + kcols[None, :],
                      mask=tvalid[:, None] & kvalid[None, :], other=0.0)  # [BT, BK]
        gs = tl.dot(w, gct, gs, input_precision=PREC)
        if HAS_REFLECT:
            ugs += tl.sum(w * tl.load(ugc_ptr + b * T + tc, mask=tvalid, other=0.0)[None, :], axis=1)
    _store_block(as_ptr, (b * S + s) * Kc, gs, ugs, b, kcols, svalid, k, B, HAS_REFLECT, BB)

    cs = tl.load(ps_ptr + (b * S + s)[:, None] * Kp + kcols[None, :],
                 mask=svalid[:, None] & kvalid[None, :], other=0.0).to(tl.float32)
    if HAS_REFLECT:
        u = tl.load(u_ptr + b * k + kcols, mask=kvalid, other=0.0)
        sv = tl.load(ps_ptr + (b * S + s) * Kp + k + b * VSTEP, mask=svalid, other=0.0).to(tl.float32) * -0.5
        cs = cs - 2.0 * sv[:, None] * u[None, :]
    for t0 in range(0, T, BT):
        tc = t0 + tl.arange(0, BT)
        tvalid = tc < T
        gct = tl.load(gc_ptr + (b * T + tc)[:, None] * k + kcols[None, :],
                      mask=tvalid[:, None] & kvalid[None, :], other=0.0)  # [BT, BK]
        gw = tl.dot(cs, tl.trans(gct), input_precision=PREC)  # [BS, BT]
        tl.store(gw_ptr + b * (S + 1) * T + s[:, None] * T + tc[None, :], gw,
                 mask=svalid[:, None] & tvalid[None, :])


@triton.jit
def _add_product_kernel(x_ptr, a_ptr, w_ptr, out_ptr, N, d, K,
                        IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        X_FIRST: tl.constexpr):
    """out = x + A W^T for one [BM, BN] tile: x, out [N, d]; A [N, K]; W [d, K] (RV), with
    K small (k + B). What torch.addmm(x, A, W.t()) computes, without the copy of x into out
    that addmm makes before its GEMM (a read and a write of [N, d] more). X_FIRST: the x
    tile is loaded before the products (its load then overlaps them) as the accumulator."""
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    rvalid = rows < N
    cvalid = cols < d
    m2 = rvalid[:, None] & cvalid[None, :]
    off = rows[:, None] * d + cols[None, :]
    if X_FIRST:
        acc = tl.load(x_ptr + off, mask=m2, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        kvalid = kk < K
        a = tl.load(a_ptr + rows[:, None] * K + kk[None, :], mask=rvalid[:, None] & kvalid[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * K + kk[:, None], mask=kvalid[:, None] & cvalid[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, wt, acc)
    if not X_FIRST:
        acc += tl.load(x_ptr + off, mask=m2, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _project_kernel(x_ptr, r_ptr, v_ptr, p_ptr, n, d, k, Kp, d_per_split, rows_total,
                    HAS_REFLECT: tl.constexpr, IEEE: tl.constexpr,
                    BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    """P[split, b * n + i] = [x_b,i R | -2 v_b . x_b,i] over this split's slice of d, for BM
    rows i of batch b (x [B, n, d], R [d, k], v [B, d]; P [splits, B * n, Kp] fp32). A tile
    holds rows of one batch, so v_b is one vector: no reflection columns of the other
    batches (cuBLAS's x RV computes all B of them), and a non-finite v_b stays in b's rows."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    rows = pid_m * BM + tl.arange(0, BM)
    rvalid = rows < n
    kcols = tl.arange(0, BK)
    kvalid = kcols < k
    x_rows = x_ptr + (b * n + rows.to(tl.int64)) * d
    acc = tl.zeros([BM, BK], dtype=tl.float32)
    xv = tl.zeros([BM, 16], dtype=tl.float32)
    d_lo = split * d_per_split
    for d0 in range(0, d_per_split, BD):
        dcols = d_lo + d0 + tl.arange(0, BD)
        dvalid = (dcols < d) & (d0 + tl.arange(0, BD) < d_per_split)
        acc, xv = _project_chunk(x_rows, rvalid, dcols, dvalid, r_ptr, v_ptr + b * d, kcols, kvalid, k, acc, xv,
                                 HAS_REFLECT, IEEE, True)
    out_rows = (split * rows_total + b * n + rows.to(tl.int64)) * Kp
    tl.store(p_ptr + out_rows[:, None] + kcols[None, :], acc, mask=rvalid[:, None] & kvalid[None, :])
    if HAS_REFLECT:
        tl.store(p_ptr + out_rows + k, -2.0 * tl.sum(xv, axis=1), mask=rvalid)


# --------------------------------------------------------------------------------------
# Choice of path and launchers
# --------------------------------------------------------------------------------------


PATHS = ("fused", "projected", "onepass", "chunked")


# The forward takes the projected path from B*T*d = 2^19 up. Measured on an H200 (bf16,
# benchmarks/results/ops_h200_60b8923.json, CUDA-graph replay): projected against fused,
# forward, 59 vs 78 us at Llama-3-8B B=8 T=32 (B*T*d = 2^20) and 122 vs 172 us at B=32 T=128;
# fused faster at SmolLM2 B=16 T=24 (2^17.8), 34 vs 40 us. The backward took the projected
# path in less time at every shape measured (forward+backward 137 vs 193 us at SmolLM2,
# 196 vs 338 at Llama B=8 T=32), so it takes it whenever it can.
FORWARD_PROJECTED_FROM = 2 ** 19


def soft_path(B: int, T: int, d: int, k: int, backward: bool = False) -> str:
    """Which soft path the triton backend's forward (or, with backward=True, backward)
    takes: "projected" while the reflection columns stay few next to k (they widen every GEMM
    by B) and a row's k columns fit one block; the forward only from B*T*d =
    FORWARD_PROJECTED_FROM up; else "fused" (triton_kernels.py).
    HYPERDAS_FAST_TRITON_SOFT=fused|projected|onepass|chunked forces a path (all but fused
    need k <= 512). "onepass" (never chosen by itself: slower than projected at every shape
    an H200 timed) is the projected forward with the base side in one kernel per row tile,
    which reads base once from memory instead of twice. "chunked" (never chosen by itself;
    no GPU has timed it) runs the projected forward over chunks of examples so that the
    output kernel finds each chunk's base in the L2 (``forward_chunked``). The backward of
    both is the projected one."""
    path = os.environ.get(ENV_PATH, "")
    if path not in ("",) + PATHS:
        raise ValueError(f"{ENV_PATH} must be one of {', '.join(PATHS)} (or unset), got {path!r}")
    if path == "fused" or k > MAX_K:
        return "fused"
    if path:
        return path
    if B > max(64, 2 * k):
        return "fused"
    return "projected" if backward or B * T * d >= FORWARD_PROJECTED_FROM else "fused"


def _p2(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _launch_config(x: Tensor, k: int, B: int) -> dict:
    if x.device.type == "cpu":  # the interpreter: the smallest blocks tl.dot takes
        return dict(BT=16, BS=16, BK=_p2(k, 16), BB=16, W=1, BS2=16, BT2=16, W2=1, BT1=16, BD1=32, W1=1, S1=1)
    BK = _p2(k, 16)
    ieee = x.dtype == torch.float32
    # rows kernel: ~6 live [BT, BK] fp32 tiles in the backward; 8 warps from BK = 256.
    # onepass: BT1 rows per program over all of d (one wave of B*T/32 programs at B*T = 4096);
    # fp32 runs its dots on FMA units, with smaller tiles.
    return dict(BT=16, BS=32, BK=BK, BB=min(64, _p2(B, 16)), W=4 if BK <= 128 else 8,
                BS2=16, BT2=32 if BK <= 128 else 16, W2=4 if BK <= 128 else 8,
                BT1=32 if BK <= 128 else 16, BD1=(32 if ieee else 64) // (2 if BK >= 512 else 1), W1=8, S1=3)


def add_product(x: Tensor, A: Tensor, W: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """x + A W^T as a new tensor, or into out (x, out [N, d], A [N, K], W [d, K], all
    contiguous, one dtype): one pass over x, where torch.addmm first copies x into its result."""
    N, d = x.shape
    out = torch.empty_like(x) if out is None else out
    cfg = _add_product_config(x)
    _add_product_kernel[(triton.cdiv(N, cfg["BM"]), triton.cdiv(d, cfg["BN"]))](
        x, A, W, out, N, d, A.shape[1], IEEE=x.dtype == torch.float32, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"],
        X_FIRST=cfg["X_FIRST"], num_warps=cfg["W"], num_stages=cfg["S"])
    return out


def _add_product_config(x: Tensor) -> dict:
    if x.device.type == "cpu":  # the interpreter: the smallest blocks tl.dot takes
        return dict(BM=16, BN=32, BK=16, W=1, S=1, X_FIRST=True)
    if x.dtype == torch.float32:  # ieee dots on the FMA units: smaller tiles
        return dict(BM=64, BN=64, BK=32, W=4, S=2, X_FIRST=True)
    # The fastest of 12 configurations on an H200 at Llama-3-8B B=32 T=128, bf16
    # (benchmarks/results/triton_add_product_sweep_h200.json): 36 us alone against 40 for
    # 128 x 128 tiles with 8 warps; all 12 took 36-51 us, against 21 us for a copy of base.
    return dict(BM=64, BN=128, BK=32, W=4, S=3, X_FIRST=False)


def _precision(x: Tensor) -> str:
    """The k-space products' precision: "ieee" for fp32 inputs (as torch's fp32 matmul);
    "tf32" (tensor cores) for bf16/fp16 inputs, whose k-space operands are either exact in
    tf32 (the weights and P_S, P_B, in the inputs' dtype) or fp32 values (g_c, R_b^T source)
    rounded to tf32's 11 bits, no coarser than the bf16/fp16 results they end in. ieee ran these products
    on the FMA units: 44 us for the sources kernel at Llama-3-8B B=32 T=128 on an H200."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _rv(basis: Tensor, reflect: Optional[Tensor]) -> Tensor:
    """[R | -2 V^T] ([d, k + B], basis's dtype), or R without reflect.

    Non-finite entries of V are zeroed here: the block matrices hold zeros in the other
    examples' reflection columns, and 0 * inf = NaN would carry one example's non-finite v
    into every example's output and gradients. That example's own rows still come out
    non-finite, as in the reference, through u = R^T v (computed from the raw reflect)."""
    if reflect is None:
        return basis
    V = torch.nan_to_num((-2.0 * reflect.t()).to(basis.dtype), nan=0.0, posinf=0.0, neginf=0.0)
    return torch.cat([basis, V], dim=1)


def _project(x: Tensor, RV: Tensor) -> Tensor:
    """x [B, X, d] -> x RV [B*X, Kc] (one GEMM, in x's dtype as the ATen version)."""
    return x.reshape(-1, x.shape[-1]) @ RV


ENV_PROJECTION = "HYPERDAS_FAST_TRITON_PROJECTION"
PROJECTIONS = ("cublas", "triton")


def projection_method() -> str:
    """How the projected path computes P = x [R | -2 v] over d: "cublas" (the default: one
    GEMM x RV, every example's reflection column in every row) or "triton" (``_project_kernel``:
    tiles of one example's rows, split over d, only that example's column). Set by
    HYPERDAS_FAST_TRITON_PROJECTION. "triton" is not the default until a GPU has timed it
    (``sweep_triton_forward.py --path projection``): cuBLAS streamed the projections at
    1.3-1.6 TB/s on an H200 (121 tiles of 96 x 64 at Llama-3-8B B=32 T=128, about one wave),
    and the Triton kernel is there to show whether more, split-d programs stream faster."""
    method = os.environ.get(ENV_PROJECTION, "") or "cublas"
    if method not in PROJECTIONS:
        raise ValueError(f"{ENV_PROJECTION} must be one of {', '.join(PROJECTIONS)} (or unset), got {method!r}")
    return method


def projection_layout(B: int, k: int, has_reflect: bool, dtype: torch.dtype, method: Optional[str] = None):
    """(columns, v-column step, dtype) of the projections P_S, P_B, P_G for ``method``
    (default: ``projection_method()``). cuBLAS: [x R | x (-2 v_1) .. x (-2 v_B)] in x's dtype,
    row b's own column at k + b (step 1). Triton: [x R | x (-2 v_b)] in fp32, column k (step 0).
    The fake kernel of ``interchange_triton_train`` gives the same shapes."""
    method = method or projection_method()
    if method == "cublas":
        return k + (B if has_reflect else 0), 1, dtype
    return k + (1 if has_reflect else 0), 0, torch.float32


def project_triton(x: Tensor, basis: Tensor, reflect: Optional[Tensor]) -> Tensor:
    """x [B, X, d] -> [x R | -2 v_b . x] [B*X, k (+1)] fp32 (``_project_kernel``; basis in
    x's dtype). Split over d into ``SPLIT`` slices when the row
    tiles alone are too few to keep the GPU busy; the slices' partial products are then
    summed by torch in a fixed order (deterministic, no atomics)."""
    B, X, d = x.shape
    k = basis.shape[1]
    Kp = k + (1 if reflect is not None else 0)
    # (no copies where they already are: a QR factor is column-major)
    x, basis = x.contiguous(), basis.contiguous()
    reflect = reflect.contiguous() if reflect is not None else None
    cfg = _project_config(x, B * X)
    split = max(1, min(cfg["SPLIT"], triton.cdiv(d, cfg["BD"])))
    d_per_split = triton.cdiv(triton.cdiv(d, split), cfg["BD"]) * cfg["BD"]
    split = triton.cdiv(d, d_per_split)
    P = torch.empty(split, B * X, Kp, device=x.device, dtype=torch.float32)
    _project_kernel[(triton.cdiv(X, cfg["BM"]), B, split)](
        x, basis, reflect if reflect is not None else basis, P, X, d, k, Kp, d_per_split, B * X,
        HAS_REFLECT=reflect is not None, IEEE=x.dtype == torch.float32,
        BM=cfg["BM"], BK=_p2(k, 16), BD=cfg["BD"], num_warps=cfg["W"], num_stages=cfg["S"])
    return P[0] if split == 1 else P.sum(0)


def _project_config(x: Tensor, rows: int) -> dict:
    """Block sizes of ``_project_kernel`` for x with ``rows`` rows in all."""
    if x.device.type == "cpu":  # the interpreter: the smallest blocks tl.dot takes; SPLIT 2 tests the sum
        return dict(BM=16, BD=32, SPLIT=2, W=1, S=1)
    # Untimed (see projection_method): 64-row tiles, and d split until there are about two
    # programs per SM of an H100/H200 (132 SMs): at Llama-3-8B B=32 T=128 that is 64 row
    # tiles per tensor, split 4 ways. Tiles and warps that compile for sm_90 without spilling
    # (ptxas, k = 128): bf16 236 registers, fp32 (x . v on the FMA units) 143.
    tiles = max(1, rows // 64)
    split = max(1, min(8, 264 // tiles))
    if x.dtype == torch.float32:
        return dict(BM=64, BD=32, SPLIT=split, W=8, S=2)
    return dict(BM=64, BD=32, SPLIT=split, W=4, S=4)


def projections(xs, RV: Tensor, basis: Tensor, reflect: Optional[Tensor], method: str):
    """P for each x in xs, by ``method`` (see ``projection_layout``)."""
    if method == "cublas":
        return [_project(x, RV) for x in xs]
    return [project_triton(x, basis, reflect) for x in xs]


def forward(base: Tensor, source: Tensor, weights: Tensor, basis: Tensor, reflect: Optional[Tensor],
            u: Tensor, m: Tensor, m_stride: int, has_mask: bool, keep_projections: bool = False,
            out: Optional[Tensor] = None):
    """out [B, T, d]. base, source, weights, basis, reflect contiguous; u = R^T v [B, k] fp32;
    m the mask ([B, k] with m_stride k, or [k] with m_stride 0). With keep_projections,
    (out, P_S [B*S, Kc], P_B [B*T, Kc]): the backward takes them instead of two GEMMs over d.
    out: a contiguous [B, T, d] tensor to write into (else a new one)."""
    B, T, d = base.shape
    S, k = source.shape[1], basis.shape[1]
    basis = basis.to(base.dtype)
    RV = _rv(basis, reflect)
    Kc = RV.shape[1]
    method = projection_method()
    PS, PB = projections((source, base), RV, basis, reflect, method)
    Kp, vstep, _ = projection_layout(B, k, reflect is not None, base.dtype, method)
    E = torch.empty(B * T, Kc, device=base.device, dtype=base.dtype)
    cfg = _launch_config(base, k, B)
    ntile = triton.cdiv(T, cfg["BT"])
    _kspace_rows_kernel[(ntile, B)](
        PS, PB, PB, weights, u, m, m_stride,
        E, E, u, u, u, u, u,
        T, S, k, Kc, Kp, vstep, B, ntile,
        HAS_REFLECT=reflect is not None, HAS_MASK=has_mask, HAS_GRAD=False,
        BT=cfg["BT"], BK=cfg["BK"], BS=cfg["BS"], BB=cfg["BB"], PREC=_precision(base), num_warps=cfg["W"],
    )
    out = add_product(base.view(B * T, d), E, RV, None if out is None else out.view(B * T, d)).view(B, T, d)
    return (out, PS, PB) if keep_projections else out


ENV_CHUNK_MB = "HYPERDAS_FAST_TRITON_CHUNK_MB"


def chunk_examples(T: int, d: int, element_size: int) -> int:
    """Examples per chunk of the chunked forward: as many as keep a chunk's base under
    HYPERDAS_FAST_TRITON_CHUNK_MB (default 12 MB; an H100's L2 holds 50 MB), at least one."""
    value = os.environ.get(ENV_CHUNK_MB, "12")
    try:
        mb = float(value)
    except ValueError:
        raise ValueError(f"{ENV_CHUNK_MB} must be a number of megabytes, got {value!r}") from None
    if not mb > 0:
        raise ValueError(f"{ENV_CHUNK_MB} must be positive, got {value!r}")
    return max(1, int(mb * 2**20) // max(1, T * d * element_size))


def forward_chunked(base: Tensor, source: Tensor, weights: Tensor, basis: Tensor, reflect: Optional[Tensor],
                    u: Tensor, m: Tensor, m_stride: int, has_mask: bool) -> Tensor:
    """``forward`` over chunks of examples (``chunk_examples``), one after another, into one
    output. The projected forward reads base twice (its projection, then the output kernel);
    per chunk, the second read should find the chunk's base still in the L2, so base would
    come from memory once. Each chunk's RV also carries only its own examples' reflection
    columns. Experimental (HYPERDAS_FAST_TRITON_SOFT=chunked), and slower: on an H200 at
    Llama-3-8B B=32 T=128 it took 223 against 103 us, and no part of it gained from the
    chunks (benchmarks/results/profile_forward_h200_600b5a3.json; README, "The op")."""
    B = base.shape[0]
    per = chunk_examples(base.shape[1], base.shape[2], base.element_size())
    if per >= B:
        return forward(base, source, weights, basis, reflect, u, m, m_stride, has_mask)
    out = torch.empty_like(base)
    for b0 in range(0, B, per):
        rows = slice(b0, min(B, b0 + per))
        forward(base[rows], source[rows], weights[rows], basis, None if reflect is None else reflect[rows],
                u if reflect is None else u[rows], m[rows] if m_stride else m, m_stride, has_mask, out=out[rows])
    return out


def forward_onepass(base: Tensor, source: Tensor, weights: Tensor, basis: Tensor, reflect: Optional[Tensor],
                    u: Tensor, m: Tensor, m_stride: int, has_mask: bool) -> Tensor:
    """As ``forward``, with P_B, the k-space step and the output in one kernel per row tile."""
    B, T, d = base.shape
    S, k = source.shape[1], basis.shape[1]
    basis = basis.to(base.dtype)
    RV = _rv(basis, reflect)
    PS = _project(source, RV)
    out = torch.empty_like(base)
    cfg = _launch_config(base, k, B)
    _onepass_forward_kernel[(triton.cdiv(T, cfg["BT1"]), B)](
        base, out, PS, weights, basis, reflect if reflect is not None else u, u, m, m_stride,
        T, S, d, k, RV.shape[1],
        HAS_REFLECT=reflect is not None, HAS_MASK=has_mask, IEEE=base.dtype == torch.float32,
        BT=cfg["BT1"], BK=cfg["BK"], BD=cfg["BD1"], BS=cfg["BS"], PREC=_precision(base),
        num_warps=cfg["W1"], num_stages=cfg["S1"],
    )
    return out


_OUT_DTYPE_GEMMS = {}  # use -> False once that use found torch without its out_dtype GEMMs


def out_dtype_gemms(use: str, a: Tensor, b: Tensor, gemms):
    """gemms() where its GEMMs can take torch's fp32 out_dtype (mm / addmm of bf16/fp16 CUDA
    operands a, b of one dtype, fp32 products and result; torch >= 2.8); else None, and the
    caller upcasts instead. A torch without them is remembered per use for the process; an
    out-of-memory error is raised, not taken for one."""
    if not (a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16)
            and _OUT_DTYPE_GEMMS.get(use, True)):
        return None
    try:
        return gemms()
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError, NotImplementedError):  # a torch without them
        _OUT_DTYPE_GEMMS[use] = False
        return None


def _gemm_sum_t_fp32(terms) -> Tensor:
    """sum_i X_i^T A_i in fp32, for X_i [n_i, d] and A_i [n_i, Kc] of one dtype. For bf16/fp16
    CUDA operands the GEMMs accumulate into one fp32 result (cuBLAS's beta = 1), as the cuda
    backend does (csrc/common/interchange_projected.h: gemm_sum_t), where rounding each
    product to bf16 and adding took a copy and two adds besides (about 10 us at Llama-3-8B
    B=32 T=128 on an H200, measured in the cuda backend: profile_forward_backward_h200_45e5f3b.json
    against _009a417.json) and lost each term's low bits."""
    x0, a0 = terms[0]

    def accumulated():
        total = torch.mm(x0.t(), a0, out_dtype=torch.float32)
        for x, a in terms[1:]:
            torch.addmm(total, x.t(), a, out_dtype=torch.float32, out=total)
        return total

    total = out_dtype_gemms("gemm_sum", x0, a0, accumulated)
    if total is not None:
        return total
    total = (x0.t() @ a0).float()
    for x, a in terms[1:]:
        if x.dtype == torch.float32:
            total.addmm_(x.t(), a)  # accumulated by the GEMM
        else:
            total += x.t() @ a
    return total


def _reflect_terms(GR: Tensor, k: int, y: Tensor, reflect: Tensor, basis: Tensor):
    """(g_basis, g_reflect) = (GR[:, :k] - 2 V^T y, -2 (GR[:, k:]^T + y R^T)), y [B, k] fp32;
    g_basis fp32, g_reflect in reflect's dtype (addmm's result is contiguous, as the fake
    kernel promises). For bf16/fp16 CUDA operands y is rounded to their dtype and the GEMMs
    give fp32 results, as in the cuda backend (backward_gemms), where upcasting V and R for
    fp32 GEMMs took four kernels and 17 us there (profile_forward_backward_h200_009a417.json
    against _6cbce29.json); y's rounding (2^-9 relative) is far below the op's own error in
    that dtype."""
    def low_precision():
        y_low = y.to(reflect.dtype)
        return (torch.addmm(GR[:, :k], reflect.t(), y_low, out_dtype=torch.float32, alpha=-2.0),
                torch.addmm(GR[:, k:].t(), y_low, basis.t(), out_dtype=torch.float32, beta=-2.0, alpha=-2.0))

    terms = out_dtype_gemms("reflect_terms", reflect, basis, low_precision)
    if terms is None:
        terms = (torch.addmm(GR[:, :k], reflect.float().t(), y, alpha=-2.0),
                 torch.addmm(GR[:, k:].t(), y, basis.float().t(), beta=-2.0, alpha=-2.0))
    g_basis, g_reflect = terms
    return g_basis, g_reflect.to(reflect.dtype)


def backward(grad: Tensor, base: Tensor, source: Tensor, weights: Tensor, basis: Tensor,
             reflect: Optional[Tensor], mask: Optional[Tensor], u: Tensor, m: Tensor, m_stride: int,
             PS: Optional[Tensor] = None, PB: Optional[Tensor] = None, need_base: bool = True,
             need_source: bool = True):
    """(g_base, g_source, g_weights, g_basis, g_reflect or None, g_mask or None); the
    arguments as in ``forward`` plus grad [B, T, d] (contiguous), and P_S, P_B when the
    forward kept them (else computed here). need_base / need_source False: that gradient is
    None, and its [N, d] product is not computed (hidden states of a frozen model need none:
    the usual case when a hypernetwork is trained)."""
    B, T, d = base.shape
    S, k = source.shape[1], basis.shape[1]
    N, dt, dev = B * T, base.dtype, base.device
    basis_dt = basis.to(dt)
    RV = _rv(basis_dt, reflect)
    Kc = RV.shape[1]
    # P_G in the layout of the forward's P_S and P_B when it kept them (the variable may
    # have changed since; where the two layouts coincide, either serves)
    method = projection_method()
    Kp, vstep, p_dtype = projection_layout(B, k, reflect is not None, dt, method)
    if PS is not None and (PS.shape[1], PS.dtype) != (Kp, p_dtype):
        method = PROJECTIONS[1 - PROJECTIONS.index(method)]
        Kp, vstep, _ = projection_layout(B, k, reflect is not None, dt, method)
    if PS is None:
        PS, PB = projections((source, base), RV, basis_dt, reflect, method)
    (PG,) = projections((grad,), RV, basis_dt, reflect, method)
    f32 = dict(device=dev, dtype=torch.float32)
    cfg = _launch_config(base, k, B)
    ntile = triton.cdiv(T, cfg["BT"])
    gc = torch.empty(N, k, **f32)
    ugc = torch.empty(N if reflect is not None else 1, **f32)
    g_w = torch.empty(B, S + 1, T, **f32)
    y_part = torch.empty(B, ntile, k, **f32) if reflect is not None else ugc
    gm_part = torch.empty(B, ntile, k, **f32) if mask is not None else ugc
    Ab = torch.empty(N, Kc, device=dev, dtype=dt)  # block((w_self - 1) g_c)
    Ag = torch.empty(N, Kc, device=dev, dtype=dt)  # block(e)
    As = torch.empty(B * S, Kc, device=dev, dtype=dt)  # block(g_s)
    _kspace_rows_kernel[(ntile, B)](
        PS, PB, PG, weights, u, m, m_stride,
        Ab, Ag, gc, ugc, g_w, y_part, gm_part,
        T, S, k, Kc, Kp, vstep, B, ntile,
        HAS_REFLECT=reflect is not None, HAS_MASK=mask is not None, HAS_GRAD=True,
        BT=cfg["BT"], BK=cfg["BK"], BS=cfg["BS"], BB=cfg["BB"], PREC=_precision(base), num_warps=cfg["W"],
    )
    _kspace_sources_kernel[(triton.cdiv(S, cfg["BS2"]), B)](
        PS, weights, u, gc, ugc, As, g_w,
        T, S, k, Kc, Kp, vstep, B,
        HAS_REFLECT=reflect is not None,
        BS=cfg["BS2"], BK=cfg["BK"], BT=cfg["BT2"], BB=cfg["BB"], PREC=_precision(base), num_warps=cfg["W2"],
    )
    del PS, PB, PG, gc
    g_base = add_product(grad.view(N, d), Ab, RV).view(B, T, d) if need_base else None
    g_source = (As @ RV.t()).view(B, S, d) if need_source else None
    # [g_R | sum_t (u.e) g + (u.g_c) delta]: three [d, X] x [X, Kc] GEMMs (cuBLAS), summed in fp32
    GR = _gemm_sum_t_fp32(((grad.view(N, d), Ag), (source.view(B * S, d), As), (base.view(N, d), Ab)))
    g_basis = GR[:, :k]
    g_reflect = None
    if reflect is not None:
        g_basis, g_reflect = _reflect_terms(GR, k, y_part.sum(1), reflect, basis)
    g_mask = None
    if mask is not None:
        gm = gm_part.sum(1)  # [B, k]
        g_mask = (gm if mask.dim() == 2 else gm.sum(0)).to(mask.dtype)
    return g_base, g_source, g_w.to(dt), g_basis.to(basis.dtype).contiguous(), g_reflect, g_mask
