"""A network stand-in for fast fuzzing: deterministic fake logits and no matmuls.

It honours the same `forward` contract as `LlamaNetwork` (one logits row per request) so
the scheduler and every pool run unchanged; only the numerics are fake. The next token
depends only on the request's last input token and its position, so a request's output is
the same whatever the batch, chunking or retraction — exactly what a real model gives.
It still reads each request's LoRA slot rank entry, so a poisoned or missing slot shows.
"""

from __future__ import annotations

from typing import Any

import torch

from lorainv.impl.dims import ModelDims


class DummyNetwork:
    dims = ModelDims(
        num_layers=1, hidden_size=8, num_heads=4, num_kv_heads=2, head_dim=2, intermediate_size=16, vocab_size=256
    )
    vocab_size = 256
    max_context_len = 4096

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype

    def make_kv_cache(self, size: int, device: torch.device) -> None:
        return None

    def forward(self, fb: Any, kv: Any, req_to_token: torch.Tensor, lora: Any, backend: Any) -> torch.Tensor:
        last = torch.cumsum(fb.extend_lens, 0) - 1
        tok = fb.input_ids[last]
        pos = fb.positions[last]
        nxt = (tok * 31 + pos * 17 + 7) % self.vocab_size
        logits = torch.zeros(len(last), self.vocab_size, dtype=self.dtype)
        logits[torch.arange(len(last)), nxt] = 1.0
        if lora is not None and fb.lora is not None:
            # touch the slot each segment reads: NaN poison (a missing wait) spreads to the logits
            slots = fb.lora.weight_indices
            probe = lora.A[0]["qkv"][slots, 0, 0].to(self.dtype)
            seg = torch.repeat_interleave(torch.arange(len(slots)), fb.lora.seg_lens)
            req_seg = seg[last] if len(seg) else seg
            logits = logits + 0.0 * probe[req_seg][:, None]
        return logits
