"""Reference-quality LoRA backend in plain torch: per slot, gather its tokens and run two matmuls."""

from __future__ import annotations

import torch

from lorainv.impl.backends.base import LoraBackend
from lorainv.impl.batch import LoraBatchInfo


class TorchNativeBackend(LoraBackend):
    """Groups the batch's tokens by LoRA slot (not by segment: a mixed batch has many short
    segments but at most P distinct slots) and runs each slot's two matmuls on its tokens.
    A slot's weights are read only up to its rank, so even a non-finite stale tail past the
    rank cannot leak in; rank-0 slots are skipped (they add exactly nothing).
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
        slot_of_tok = info.weight_indices[seg_of_tok]
        order = torch.argsort(slot_of_tok, stable=True)  # the tokens of each slot, contiguous
        counts = torch.bincount(slot_of_tok, minlength=len(info.ranks)).tolist()
        ranks, scalings = info.ranks.tolist(), info.scalings.tolist()
        offsets = [sum(out_sizes[:i]) for i in range(n_slices)]
        start = 0
        for p, n in enumerate(counts):
            idx, start, r = order[start : start + n], start + n, ranks[p]
            if n == 0 or r == 0:
                continue
            xs = x.index_select(0, idx)
            a = A[p].view(n_slices, max_rank, -1)[:, :r].to(dt)  # [S, r, in]
            b = B[p, :, :r].to(dt)  # [out, r]
            h = torch.matmul(xs, a.transpose(1, 2))  # [S, n, r]
            parts = [h[i] @ b[off : off + w].T for i, (off, w) in enumerate(zip(offsets, out_sizes))]
            delta = parts[0] if n_slices == 1 else torch.cat(parts, dim=1)
            base_out.index_add_(0, idx, (delta * scalings[p]).to(base_out.dtype))
        return base_out
