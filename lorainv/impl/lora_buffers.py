"""The device-side LoRA slot memory, in the layout the kernels read.

For each layer and module group ``g`` with ``S`` stacked slices (qkv: 3, gate_up: 2,
o/down: 1), output sizes ``outs`` and max rank ``R`` over ``P`` slots:

* ``A[layer][g]``: ``[P, S*R, in]`` — slice ``i`` of slot ``p`` occupies rows ``i*R : i*R + r_p``;
* ``B[layer][g]``: ``[P, sum(outs), R]`` — slice ``i`` occupies rows ``off_i : off_i + outs[i]``
  and reads columns ``0 : r_p`` of the shrink output of slice ``i``;
* ``ranks[p]``: the rank of slot ``p`` (0 for the base model or an empty slot: a no-op);
* ``scalings[p]``: the factor ``s`` of ``y += s * (x A^T) B^T`` for slot ``p``.

Invariant (slot hygiene, L6): rows/columns past ``r_p`` and modules the adapter lacks are 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorainv.impl.dims import GROUPS, ModelDims


@dataclass
class LoraBuffers:
    num_slots: int
    max_rank: int
    A: list[dict[str, torch.Tensor]]
    B: list[dict[str, torch.Tensor]]
    ranks: torch.Tensor
    scalings: torch.Tensor

    @classmethod
    def allocate(
        cls, dims: ModelDims, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device
    ) -> LoraBuffers:
        A: list[dict[str, torch.Tensor]] = []
        B: list[dict[str, torch.Tensor]] = []
        for _ in range(dims.num_layers):
            a_l, b_l = {}, {}
            for g, mods in GROUPS.items():
                a_l[g] = torch.zeros(num_slots, len(mods) * max_rank, dims.group_in(g), dtype=dtype, device=device)
                b_l[g] = torch.zeros(num_slots, sum(dims.group_out_sizes(g)), max_rank, dtype=dtype, device=device)
            A.append(a_l)
            B.append(b_l)
        return cls(
            num_slots=num_slots,
            max_rank=max_rank,
            A=A,
            B=B,
            ranks=torch.zeros(num_slots, dtype=torch.long, device=device),
            scalings=torch.zeros(num_slots, dtype=torch.float64, device=device),
        )
