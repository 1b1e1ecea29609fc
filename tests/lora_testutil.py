"""Helpers for LoRA tests: random stacked adapters and writing them into `LoraBuffers` slots."""

from __future__ import annotations

import torch

from lorainv.impl.dims import GROUPS, ModelDims
from lorainv.impl.lora_buffers import LoraBuffers

LoraLayer = dict[str, tuple[torch.Tensor, torch.Tensor]]


def random_lora_layers(
    dims: ModelDims,
    rank: int,
    gen: torch.Generator,
    dtype: torch.dtype = torch.float64,
    groups: tuple[str, ...] = tuple(GROUPS),
    std: float = 0.3,
) -> list[LoraLayer]:
    """Per layer ``{group: (A [S*rank, in], B [sum(outs), rank])}`` with random A and B."""
    layers = []
    for _ in range(dims.num_layers):
        layer: LoraLayer = {}
        for g in groups:
            n_in, outs = dims.group_in(g), dims.group_out_sizes(g)
            a = torch.randn(len(outs) * rank, n_in, generator=gen, dtype=torch.float64) * std / n_in**0.5
            b = torch.randn(sum(outs), rank, generator=gen, dtype=torch.float64) * std
            layer[g] = (a.to(dtype), b.to(dtype))
        layers.append(layer)
    return layers


def write_slot(buffers: LoraBuffers, slot: int, layers: list[LoraLayer] | None, scaling: float) -> None:
    """Place an adapter in ``slot`` in the kernels' layout (rank tail and absent groups zeroed);
    ``layers=None`` makes the slot a rank-0 no-op."""
    R = buffers.max_rank
    rank = 0
    for n in range(len(buffers.A)):
        for g, a_buf in buffers.A[n].items():
            b_buf = buffers.B[n][g]
            a_buf[slot].zero_()
            b_buf[slot].zero_()
            if layers is None or g not in layers[n]:
                continue
            a, b = layers[n][g]
            rank = int(b.shape[1])
            for i in range(len(GROUPS[g])):
                a_buf[slot, i * R : i * R + rank] = a[i * rank : (i + 1) * rank]
            b_buf[slot, :, :rank] = b
    buffers.ranks[slot] = rank
    buffers.scalings[slot] = scaling if rank else 0.0


class PagedRunner:
    """Drives `LlamaNetwork.forward` like an engine would: a token pool handed out in a seeded
    random (page-scattered) order, one ``req_to_token`` row per request, prefix lengths tracked."""

    def __init__(self, net, buffers: LoraBuffers | None, backend, *, pool: int = 400, rows: int = 8, seed: int = 0):
        from lorainv.impl.llama import KVCache

        self.net, self.buffers, self.backend = net, buffers, backend
        self.kv = KVCache.allocate(net.config, pool, net.dtype)
        self.req_to_token = torch.zeros(rows, net.max_context_len, dtype=torch.long)
        gen = torch.Generator().manual_seed(seed)
        self.free = (torch.randperm(pool - 1, generator=gen) + 1).tolist()  # index 0 is padding
        self.lens = [0] * rows

    def step(self, batch: list[tuple[int, list[int], int]], mode: str = "extend") -> torch.Tensor:
        """``batch`` holds ``(row, new_tokens, slot)`` per request; returns ``[B, vocab]`` logits."""
        from lorainv.impl.batch import ForwardBatch, build_lora_batch_info

        ids, pos, locs = [], [], []
        for row, toks, _ in batch:
            start = self.lens[row]
            new = [self.free.pop() for _ in toks]
            self.req_to_token[row, start : start + len(toks)] = torch.tensor(new)
            ids += toks
            pos += range(start, start + len(toks))
            locs += new
        lora = None
        if self.buffers is not None:
            lora = build_lora_batch_info(
                [s for _, _, s in batch], [len(t) for _, t, _ in batch], self.buffers.ranks, self.buffers.scalings
            )
        fb = ForwardBatch(
            mode=mode,
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(pos, dtype=torch.long),
            rows=torch.tensor([r for r, _, _ in batch], dtype=torch.long),
            prefix_lens=torch.tensor([self.lens[r] for r, _, _ in batch], dtype=torch.long),
            extend_lens=torch.tensor([len(t) for _, t, _ in batch], dtype=torch.long),
            out_cache_loc=torch.tensor(locs, dtype=torch.long),
            lora=lora,
        )
        fb.check_valid()
        for row, toks, _ in batch:
            self.lens[row] += len(toks)
        return self.net.forward(fb, self.kv, self.req_to_token, self.buffers, self.backend)
