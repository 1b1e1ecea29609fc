"""The LoRA backend interface: one call adds every segment's low-rank delta to a base output."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from lorainv.impl.batch import LoraBatchInfo


class LoraBackend(ABC):
    """Applies stacked multi-slice LoRA to a batch of segments.

    ``apply`` is pure with respect to the runtime's pools: it reads the slot buffers and the
    batch info and writes only into ``base_out`` (in place), which it returns.
    """

    name: str = ""

    def apply(
        self,
        x: torch.Tensor,
        base_out: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        info: LoraBatchInfo,
        out_sizes: tuple[int, ...],
    ) -> torch.Tensor:
        """Semantics: for every token t of segment g with slot p = weight_indices[g], r = ranks[p],
        s = scalings[p] and every slice i (output columns off_i : off_i + out_sizes[i]):
        ``y[t, off_i:off_i+o_i] = base_out[t, off_i:off_i+o_i]
        + s * (x[t] @ A[p, i*R : i*R+r].T) @ B[p, off_i:off_i+o_i, :r].T``.

        Shapes: x ``[T, in]``, base_out ``[T, sum(out_sizes)]``, A ``[P, S*R, in]``,
        B ``[P, sum(out_sizes), R]`` with ``S = len(out_sizes)``; ``T == info.seg_indptr[-1]``.
        A rank-0 slot adds exactly nothing. Returns ``base_out`` (updated in place).
        """
        n_slices, max_rank = check_shapes(x, base_out, A, B, out_sizes)
        if x.shape[0] == 0 or info.num_segments == 0 or info.max_len == 0:
            return base_out
        return self._apply(x, base_out, A, B, info, out_sizes, n_slices, max_rank)

    @abstractmethod
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
        """The backend's kernel(s) for a validated, non-empty batch (same semantics as `apply`)."""


def check_shapes(
    x: torch.Tensor, base_out: torch.Tensor, A: torch.Tensor, B: torch.Tensor, out_sizes: tuple[int, ...]
) -> tuple[int, int]:
    """Validate the shapes of an ``apply`` call; return ``(num_slices, max_rank)``."""
    n_slices = len(out_sizes)
    if A.dim() != 3 or B.dim() != 3 or x.dim() != 2 or base_out.dim() != 2:
        raise ValueError("LoRA apply expects x [T, in], base_out [T, out], A [P, S*R, in], B [P, out, R]")
    if n_slices == 0 or A.shape[1] % n_slices:
        raise ValueError(f"A has {A.shape[1]} rows, not a multiple of {n_slices} slices")
    max_rank = A.shape[1] // n_slices
    out_total = sum(out_sizes)
    if A.shape[2] != x.shape[1] or B.shape[1] != out_total or B.shape[2] != max_rank or B.shape[0] != A.shape[0]:
        raise ValueError(
            f"LoRA shapes disagree: x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, outs {out_sizes}"
        )
    if base_out.shape != (x.shape[0], out_total):
        raise ValueError(f"base_out {tuple(base_out.shape)} != ({x.shape[0]}, {out_total})")
    return n_slices, max_rank
