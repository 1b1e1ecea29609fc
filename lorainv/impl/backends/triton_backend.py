"""Triton LoRA backend: a segmented *shrink* kernel (``x A^T``) and *expand* kernel (``h B^T s``).

Both kernels grid over ``(token blocks [x out blocks], slices, segments)``. Each program reads its
segment's slot and rank; a rank-0 slot or a block past the segment's end does nothing. The rank
dimension is masked by the slot's own rank, so a slot packed at a small rank is never read with
the buffer's max-rank extent. Accumulation is in float32 (float64 for float64 inputs), which keeps
bf16/fp16 exact under ``TRITON_INTERPRET=1`` as on a GPU. Blocks are powers of two, at least 16
(``tl.dot`` minimum on NVIDIA), and every load/store is masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorainv.impl.backends.base import LoraBackend
from lorainv.impl.batch import LoraBatchInfo

BLOCK_M = 16
BLOCK_N = 32
BLOCK_K = 32


@triton.jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    h_ptr,
    seg_indptr_ptr,
    weight_idx_ptr,
    ranks_ptr,
    K,
    max_rank,
    stride_xm,
    stride_xk,
    stride_ap,
    stride_ar,
    stride_ak,
    stride_hm,
    stride_hr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """Semantics: ``h[t, i*R + j] = sum_k x[t, k] * A[p, i*R + j, k]`` for ``j < ranks[p]``, every
    token t of segment g (p = weight_idx[g]) and slice i; entries with ``j >= ranks[p]`` are left
    unwritten and never read. Shapes: x ``[T, K]``, A ``[P, S*R, K]``, h ``[T, S*R]`` (ACC dtype).
    Grid: ``(cdiv(max_len, BLOCK_M), S, num_segments)``.
    """
    pid_m = tl.program_id(0)
    sl = tl.program_id(1)
    seg = tl.program_id(2)
    start = tl.load(seg_indptr_ptr + seg)
    end = tl.load(seg_indptr_ptr + seg + 1)
    slot = tl.load(weight_idx_ptr + seg)
    rank = tl.load(ranks_ptr + slot)
    m0 = start + pid_m * BLOCK_M
    if (rank > 0) & (m0 < end):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < end
        r_ok = offs_r < rank
        rows = sl * max_rank + offs_r
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < K
            xt = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                mask=m_ok[:, None] & k_ok[None, :],
                other=0.0,
            ).to(ACC)
            at = tl.load(
                a_ptr + slot * stride_ap + rows[None, :] * stride_ar + kk[:, None] * stride_ak,
                mask=k_ok[:, None] & r_ok[None, :],
                other=0.0,
            ).to(ACC)
            acc += tl.dot(xt, at, input_precision="ieee", out_dtype=ACC)
        tl.store(
            h_ptr + offs_m[:, None] * stride_hm + rows[None, :] * stride_hr,
            acc,
            mask=m_ok[:, None] & r_ok[None, :],
        )


@triton.jit
def _expand_kernel(
    h_ptr,
    b_ptr,
    y_ptr,
    seg_indptr_ptr,
    weight_idx_ptr,
    ranks_ptr,
    scalings_ptr,
    slice_off_ptr,
    max_rank,
    num_n_blocks,
    stride_hm,
    stride_hr,
    stride_bp,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACC: tl.constexpr,
):
    """Semantics: ``y[t, off_i + n] += s[p] * sum_{j < ranks[p]} h[t, i*R + j] * B[p, off_i + n, j]``
    for ``n < out_i = off_{i+1} - off_i``, every token t of segment g (p = weight_idx[g]) and slice i.
    Shapes: h ``[T, S*R]``, B ``[P, sum(out), R]``, y ``[T, sum(out)]`` (updated in place),
    slice_off ``[S+1]``. Grid: ``(cdiv(max_len, BLOCK_M) * cdiv(max(out), BLOCK_N), S, num_segments)``.
    """
    pid = tl.program_id(0)
    sl = tl.program_id(1)
    seg = tl.program_id(2)
    pid_m = pid // num_n_blocks
    pid_n = pid % num_n_blocks
    start = tl.load(seg_indptr_ptr + seg)
    end = tl.load(seg_indptr_ptr + seg + 1)
    slot = tl.load(weight_idx_ptr + seg)
    rank = tl.load(ranks_ptr + slot)
    off = tl.load(slice_off_ptr + sl)
    width = tl.load(slice_off_ptr + sl + 1) - off
    m0 = start + pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    if (rank > 0) & (m0 < end) & (n0 < width):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        m_ok = offs_m < end
        n_ok = offs_n < width
        r_ok = offs_r < rank
        ht = tl.load(
            h_ptr + offs_m[:, None] * stride_hm + (sl * max_rank + offs_r)[None, :] * stride_hr,
            mask=m_ok[:, None] & r_ok[None, :],
            other=0.0,
        ).to(ACC)
        bt = tl.load(
            b_ptr + slot * stride_bp + (off + offs_n)[None, :] * stride_bn + offs_r[:, None] * stride_br,
            mask=r_ok[:, None] & n_ok[None, :],
            other=0.0,
        ).to(ACC)
        scale = tl.load(scalings_ptr + slot).to(ACC)
        delta = tl.dot(ht, bt, input_precision="ieee", out_dtype=ACC) * scale
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + (off + offs_n)[None, :] * stride_yn
        mask = m_ok[:, None] & n_ok[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(ACC)
        tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=mask)


def _acc_dtype(dtype: torch.dtype) -> tuple[torch.dtype, tl.constexpr]:
    if dtype == torch.float64:
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def _pow2_block(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(n, 1)))


class TritonBackend(LoraBackend):
    """Segmented shrink/expand kernels; stacked slices (qkv: 3, gate_up: 2) with differing widths."""

    name = "triton"

    def _apply(
        self,
        x: torch.Tensor,
        base_out: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        info: LoraBatchInfo,
        out_sizes: tuple[int, ...],
        n_slices: int,
        max_rank: int,
    ) -> torch.Tensor:
        """Semantics: ``y[t, off_i:off_i+o_i] = base_out[t, off_i:off_i+o_i]
        + s_p * (x[t] @ A[p, i*R : i*R+r_p].T) @ B[p, off_i:off_i+o_i, :r_p].T`` for token t of a
        segment on slot p, slice i. Shapes: x ``[T, in]``, base_out ``[T, out]``, A ``[P, S*R, in]``,
        B ``[P, out, R]``. Returns ``base_out`` updated in place.
        """
        n_tok, n_seg = x.shape[0], info.num_segments
        dev = x.device
        acc_torch, acc_tl = _acc_dtype(x.dtype)
        block_r = _pow2_block(max_rank)
        y = base_out if base_out.is_contiguous() else base_out.contiguous()
        h = torch.empty(n_tok, n_slices * max_rank, dtype=acc_torch, device=dev)
        seg_indptr = info.seg_indptr.to(device=dev, dtype=torch.long)
        weight_idx = info.weight_indices.to(device=dev, dtype=torch.long)
        ranks = info.ranks.to(device=dev, dtype=torch.long)
        scalings = info.scalings.to(device=dev, dtype=acc_torch)
        offsets = [0]
        for width in out_sizes:
            offsets.append(offsets[-1] + width)
        slice_off = torch.tensor(offsets, dtype=torch.long, device=dev)

        m_blocks = triton.cdiv(info.max_len, BLOCK_M)
        _shrink_kernel[(m_blocks, n_slices, n_seg)](
            x,
            A,
            h,
            seg_indptr,
            weight_idx,
            ranks,
            x.shape[1],
            max_rank,
            x.stride(0),
            x.stride(1),
            A.stride(0),
            A.stride(1),
            A.stride(2),
            h.stride(0),
            h.stride(1),
            BLOCK_M=BLOCK_M,
            BLOCK_R=block_r,
            BLOCK_K=BLOCK_K,
            ACC=acc_tl,
        )
        n_blocks = triton.cdiv(max(out_sizes), BLOCK_N)
        _expand_kernel[(m_blocks * n_blocks, n_slices, n_seg)](
            h,
            B,
            y,
            seg_indptr,
            weight_idx,
            ranks,
            scalings,
            slice_off,
            max_rank,
            n_blocks,
            h.stride(0),
            h.stride(1),
            B.stride(0),
            B.stride(1),
            B.stride(2),
            y.stride(0),
            y.stride(1),
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_R=block_r,
            ACC=acc_tl,
        )
        if y is not base_out:
            base_out.copy_(y)
        return base_out
