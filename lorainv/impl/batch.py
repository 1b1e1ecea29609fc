"""What one forward pass reads: the token batch (`ForwardBatch`) and its LoRA segments (`LoraBatchInfo`).

A batch is a list of requests in a fixed order; request ``b`` contributes ``extend_lens[b]`` new
tokens, concatenated in batch order. Consecutive requests that use the same LoRA slot form one
*segment*; the kernels iterate over segments, never over requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch

from lorainv.errors import AdapterNotResidentError, RequestError

SEGMENTS_FROM_BATCH_SIZE = "segments_from_batch_size"


@dataclass
class LoraBatchInfo:
    """Segment metadata of one batch, in the form the LoRA backends read.

    Invariants (``check_valid``): ``seg_lens``, ``weight_indices`` have ``num_segments`` entries;
    ``seg_indptr`` has ``num_segments + 1``, starts at 0 and is the running sum of ``seg_lens``;
    ``seg_indptr[-1]`` is the batch's token count; ``max_len == max(seg_lens)`` (0 when empty);
    every weight index is a slot in ``[0, P)`` with ``P == len(ranks) == len(scalings)``.
    Segment ``s`` covers tokens ``seg_indptr[s] : seg_indptr[s + 1]`` and uses slot
    ``weight_indices[s]`` of rank ``ranks[weight_indices[s]]`` (0 = base model, a no-op).
    """

    num_segments: int
    seg_lens: torch.Tensor
    seg_indptr: torch.Tensor
    weight_indices: torch.Tensor
    ranks: torch.Tensor
    scalings: torch.Tensor
    max_len: int

    @property
    def num_tokens(self) -> int:
        return int(self.seg_indptr[-1])

    def check_valid(self) -> None:
        """Raise ``AssertionError`` naming the first broken invariant (made for tests)."""
        n = self.num_segments
        assert self.seg_lens.shape == (n,), f"seg_lens shape {tuple(self.seg_lens.shape)} != ({n},)"
        assert self.weight_indices.shape == (n,), f"weight_indices shape {tuple(self.weight_indices.shape)} != ({n},)"
        assert self.seg_indptr.shape == (n + 1,), f"seg_indptr shape {tuple(self.seg_indptr.shape)} != ({n + 1},)"
        assert int(self.seg_indptr[0]) == 0, "seg_indptr[0] != 0"
        assert torch.equal(self.seg_indptr[1:], torch.cumsum(self.seg_lens, 0)), "seg_indptr is not cumsum(seg_lens)"
        assert bool((self.seg_lens >= 0).all()), "negative segment length"
        assert self.max_len == (int(self.seg_lens.max()) if n else 0), "max_len != max(seg_lens)"
        p = self.ranks.shape[0]
        assert self.scalings.shape == (p,), "scalings and ranks disagree on the slot count"
        assert n == 0 or (int(self.weight_indices.min()) >= 0 and int(self.weight_indices.max()) < p), "bad slot"


def build_lora_batch_info(
    slots: Sequence[int],
    extend_lens: Sequence[int],
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    *,
    faults: frozenset[str] = frozenset(),
) -> LoraBatchInfo:
    """Group a batch into segments of consecutive requests sharing a LoRA slot.

    ``slots[b]`` is the slot of request ``b`` (0 or any rank-0 slot for the base model) and
    ``extend_lens[b]`` its new-token count. Every length and copy uses ``num_segments`` (the
    output of ``unique_consecutive``), never the batch size.

    Fault ``segments_from_batch_size`` re-creates the historic bug here: the segment count and
    the copy length are taken from the batch size, so any batch in which two consecutive requests
    share a slot fails with a shape error in the copy.
    """
    if len(slots) != len(extend_lens):
        raise RequestError(f"{len(slots)} slots but {len(extend_lens)} extend lengths; give one per request")
    num_slots = int(ranks.shape[0])
    for b, slot in enumerate(slots):
        if not 0 <= int(slot) < num_slots:
            raise AdapterNotResidentError(f"request {b} names slot {slot}, outside [0, {num_slots}); load it first")
    for b, n in enumerate(extend_lens):
        if int(n) < 0:
            raise RequestError(f"request {b} has a negative extend length {n}")
    device = ranks.device
    # group in plain Python (batches are small; a dozen tiny torch ops cost more than the loop)
    uniq: list[int] = []
    per_seg: list[int] = []
    for slot, n in zip(slots, extend_lens):
        if uniq and uniq[-1] == int(slot):
            per_seg[-1] += int(n)
        else:
            uniq.append(int(slot))
            per_seg.append(int(n))
    found = len(uniq)
    num_segments = copy_len = found
    if SEGMENTS_FROM_BATCH_SIZE in faults:
        num_segments = copy_len = len(slots)  # the historic bug: batch size instead of segment count

    seg_lens = torch.empty(num_segments, dtype=torch.long, device=device)
    seg_lens.copy_(torch.tensor(per_seg, dtype=torch.long, device=device).narrow(0, 0, copy_len))
    weight_indices = torch.empty(num_segments, dtype=torch.long, device=device)
    weight_indices.copy_(torch.tensor(uniq, dtype=torch.long, device=device).narrow(0, 0, copy_len))
    seg_indptr = torch.tensor(list(accumulate(per_seg[:num_segments], initial=0)), dtype=torch.long, device=device)
    return LoraBatchInfo(
        num_segments=num_segments,
        seg_lens=seg_lens,
        seg_indptr=seg_indptr,
        weight_indices=weight_indices,
        ranks=ranks,
        scalings=scalings,
        max_len=max(per_seg[:num_segments], default=0),
    )


@dataclass
class ForwardBatch:
    """The tokens of one forward pass over the paged KV cache.

    ``mode`` is ``"extend"`` (a prefill chunk on top of an existing prefix, possibly empty) or
    ``"decode"`` (exactly one new token per request). Request ``b`` owns ``req_to_token`` row
    ``rows[b]``, already holds ``prefix_lens[b]`` tokens in the cache and adds ``extend_lens[b]``;
    its new tokens are ``input_ids[o : o + extend_lens[b]]`` with ``o = sum(extend_lens[:b])``.
    The caller has already written ``req_to_token[rows[b], prefix : prefix + extend]`` to equal
    the matching slice of ``out_cache_loc``. Invariants: see ``check_valid``.
    """

    mode: str
    input_ids: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor
    prefix_lens: torch.Tensor
    extend_lens: torch.Tensor
    out_cache_loc: torch.Tensor
    lora: LoraBatchInfo | None = None

    @property
    def batch_size(self) -> int:
        return int(self.rows.shape[0])

    def check_valid(self) -> None:
        """Raise ``AssertionError`` naming the first broken invariant (made for tests)."""
        assert self.mode in ("extend", "decode"), f"mode {self.mode!r} is not 'extend' or 'decode'"
        b, t = self.batch_size, int(self.input_ids.shape[0])
        for name in ("prefix_lens", "extend_lens"):
            assert getattr(self, name).shape == (b,), f"{name} must have one entry per request ({b})"
        for name in ("positions", "out_cache_loc"):
            assert getattr(self, name).shape == (t,), f"{name} must have one entry per new token ({t})"
        assert int(self.extend_lens.sum()) == t, "sum(extend_lens) != number of new tokens"
        assert bool((self.extend_lens >= 1).all()), "every request must add at least one token"
        if self.mode == "decode":
            assert bool((self.extend_lens == 1).all()), "decode adds exactly one token per request"
        expected = torch.cat(
            [torch.arange(int(p), int(p) + int(e)) for p, e in zip(self.prefix_lens, self.extend_lens)]
            or [torch.zeros(0, dtype=torch.long)]
        )
        assert torch.equal(self.positions.cpu(), expected), "positions != prefix_len + offset within the request"
        if self.lora is not None:
            self.lora.check_valid()
            assert self.lora.num_tokens == t, "LoRA segments do not cover exactly the batch's tokens"
