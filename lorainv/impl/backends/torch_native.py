"""Reference-quality LoRA backend in plain torch: gather each segment's slot, pad, and bmm."""

from __future__ import annotations

import torch

from lorainv.impl.backends.base import LoraBackend
from lorainv.impl.batch import LoraBatchInfo


class TorchNativeBackend(LoraBackend):
    """Segments are padded to ``[num_segments, max_len, in]`` and multiplied by their slot's
    weights with ``bmm``. Columns of the rank dimension at or past ``ranks[slot]`` are masked out
    (``torch.where``, so even a non-finite stale tail cannot leak in); rank-0 slots add exact zeros.
    """

    name = "torch_native"

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
        dev, dt = x.device, x.dtype
        seg_of_tok = torch.repeat_interleave(torch.arange(n_seg, device=dev), info.seg_lens, output_size=n_tok)
        pos = torch.arange(n_tok, device=dev) - info.seg_indptr[seg_of_tok]
        xp = x.new_zeros(n_seg, info.max_len, x.shape[1])
        xp[seg_of_tok, pos] = x

        slots = info.weight_indices
        rank_of_seg = info.ranks[slots]
        live = torch.arange(max_rank, device=dev)[None, :] < rank_of_seg[:, None]  # [n_seg, R]
        a = A[slots].view(n_seg, n_slices, max_rank, -1)
        a = torch.where(live[:, None, :, None], a, torch.zeros((), dtype=A.dtype, device=dev)).to(dt)
        b = torch.where(live[:, None, :], B[slots], torch.zeros((), dtype=B.dtype, device=dev)).to(dt)
        scale = info.scalings[slots].to(dt)[:, None, None]  # [n_seg, 1, 1]

        delta = x.new_empty(n_seg, info.max_len, base_out.shape[1])
        off = 0
        for i, width in enumerate(out_sizes):
            h = torch.bmm(xp, a[:, i].transpose(1, 2))  # [n_seg, L, R]
            delta[:, :, off : off + width] = torch.bmm(h, b[:, off : off + width].transpose(1, 2)) * scale
            off += width
        base_out += delta[seg_of_tok, pos].to(base_out.dtype)
        return base_out
