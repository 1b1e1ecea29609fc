"""The fast network: integer fingerprints through the real paged KV cache, no matmuls.

It honours `LlamaNetwork`'s ``forward`` contract (one logits row per request, one-hot), so the
scheduler, the pools and the paging run unchanged, and its tokens mean something: a token is
right only if every KV cell the request reads holds the right content, at the right position,
written with the right adapter weights.

The function (the token oracle, `lorainv.model.token_oracle`, computes the same one from a
request's logical history; all arithmetic is on integers mod the prime ``P = 2**31 - 1``):

* ``ident(slot)``: blake2b (8 bytes, little-endian, mod ``P``) over the slot's *contents* in
  `LoraBuffers`: ``b"lorainv-slot"``, the rank (int64 LE), the scaling (float64 LE), then for
  every layer and group in `GROUPS` order, ``A[layer][g][slot]`` and ``B[layer][g][slot]``
  converted to float64, row-major. Never the adapter's name: a poisoned (not yet transferred),
  stale, wrong or wrongly mapped slot changes it.
* ``mix(x) = (x*x + 48271*x + 11) mod P`` (nonlinear; operands < 2**31 so int64 never overflows).
* The cell written for a new token ``t`` at position ``p`` read with slot identity ``i`` (the slot
  of the segment that covers that token in ``fb.lora``) is
  ``fp = mix(mix((t*1000003 + p*40503 + i + 1) mod P))``.
* The next token of a request whose ``req_to_token`` row covers positions ``0 .. L-1`` (prefix +
  extend) and whose last new token read slot identity ``i`` is
  ``S = sum_k (kv[row[k]] * W[k] mod P) mod P`` with ``W[k] = 3**(k+1) mod P``, then
  ``mix(mix((S + i*1000033 + L) mod P)) mod VOCAB``.

``VOCAB = 1024``: a wrong KV content or identity shows as a wrong token except with chance
about 1/1024 per token. Never-written cells hold -1.

Mutates only ``kv`` (at ``out_cache_loc``); reads ``req_to_token`` and the slot buffers.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import numpy as np
import torch

from lorainv.impl.dims import GROUPS, ModelDims

P = 2_147_483_647
VOCAB = 1024
MAX_CONTEXT = 4096
_TOK, _POS, _SALT = 1_000_003, 40_503, 1
_MIX_A, _MIX_C = 48_271, 11
_ID_MUL = 1_000_033
_W_BASE = 3
NO_LORA_IDENT = 0  # a forward without LoRA segments (never the engine's case)


def _weights(n: int) -> np.ndarray:
    w, x = [], 1
    for _ in range(n):
        x = x * _W_BASE % P
        w.append(x)
    return np.array(w, dtype=np.int64)


def _mix(x: np.ndarray) -> np.ndarray:
    return (x * x + _MIX_A * x + _MIX_C) % P


def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (shared memory: writes go to the tensor); a copy otherwise."""
    return t.detach().numpy() if t.device.type == "cpu" else t.detach().cpu().numpy()


class FingerprintNetwork:
    """Deterministic content-checked network; see the module docstring for the exact function.

    The arithmetic runs in numpy on views of the torch tensors (tiny batches: torch's per-op
    overhead would dominate); the KV store itself is a CPU int64 torch tensor.
    """

    dims = ModelDims(
        num_layers=1, hidden_size=8, num_heads=4, num_kv_heads=2, head_dim=2, intermediate_size=16, vocab_size=VOCAB
    )
    vocab_size = VOCAB
    max_context_len = MAX_CONTEXT
    _W = _weights(MAX_CONTEXT)

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        # buffer tensor id -> (the tensor, a float64 numpy view or None): views share memory, so
        # they always show the current contents; the tensor reference keeps the id from reuse.
        self._views: dict[int, tuple[torch.Tensor, np.ndarray | None]] = {}

    def make_kv_cache(self, size: int, device: torch.device) -> torch.Tensor:
        """One int64 fingerprint per token cell, kept on the CPU; -1 means never written."""
        return torch.full((size,), -1, dtype=torch.long)

    def _slot_bytes(self, buf: torch.Tensor, slot: int) -> bytes:
        hit = self._views.get(id(buf))
        if hit is None or hit[0] is not buf:
            numpy_ok = buf.device.type == "cpu" and buf.dtype in (torch.float64, torch.float32, torch.float16)
            view = buf.detach().numpy() if numpy_ok else None
            hit = self._views[id(buf)] = (buf, view)
        if hit[1] is not None:
            return hit[1][slot].astype("<f8", copy=False).tobytes()
        return _np(buf[slot].to(torch.float64)).astype("<f8", copy=False).tobytes()

    def slot_identity(self, lora: Any, slot: int) -> int:
        """``ident(slot)`` over the slot's current contents (see the module docstring)."""
        h = hashlib.blake2b(b"lorainv-slot", digest_size=8)
        h.update(struct.pack("<q", int(_np(lora.ranks)[slot])))
        h.update(struct.pack("<d", float(_np(lora.scalings)[slot])))
        for layer in range(len(lora.A)):
            for g in GROUPS:
                h.update(self._slot_bytes(lora.A[layer][g], slot))
                h.update(self._slot_bytes(lora.B[layer][g], slot))
        return int.from_bytes(h.digest(), "little") % P

    def forward(self, fb: Any, kv: torch.Tensor, req_to_token: torch.Tensor, lora: Any, backend: Any) -> torch.Tensor:
        """Write the new tokens' fingerprints at ``fb.out_cache_loc``; return one-hot logits of
        each request's next token, read through its ``req_to_token`` row."""
        ids = _np(fb.input_ids).astype(np.int64)
        n_tok = len(ids)
        if fb.lora is not None and lora is not None:
            slots = _np(fb.lora.weight_indices).tolist()
            table = {s: self.slot_identity(lora, s) for s in set(slots)}
            seg_ident = np.array([table[s] for s in slots], dtype=np.int64)
            tok_ident = np.repeat(seg_ident, _np(fb.lora.seg_lens))
        else:
            tok_ident = np.full(n_tok, NO_LORA_IDENT, dtype=np.int64)
        x = (ids * _TOK + _np(fb.positions).astype(np.int64) * _POS + tok_ident + _SALT) % P
        cells = _np(kv)
        cells[_np(fb.out_cache_loc).astype(np.int64)] = _mix(_mix(x))
        if kv.device.type != "cpu":  # pragma: no cover - the store is made on the CPU
            kv.copy_(torch.from_numpy(cells))

        ext = _np(fb.extend_lens).astype(np.int64)
        total = _np(fb.prefix_lens).astype(np.int64) + ext
        req_ident = tok_ident[np.cumsum(ext) - 1]
        width = int(total.max()) if len(total) else 0
        rows = _np(req_to_token)[_np(fb.rows).astype(np.int64), :width].astype(np.int64)
        valid = np.arange(width)[None, :] < total[:, None]
        read = cells[np.where(valid, rows, 0)]
        terms = np.where(valid, read * self._W[:width][None, :] % P, 0)
        s = terms.sum(1) % P
        nxt = _mix(_mix((s + req_ident * _ID_MUL + total) % P)) % VOCAB
        logits = torch.zeros(len(total), VOCAB, dtype=self.dtype)
        logits[torch.arange(len(total)), torch.from_numpy(nxt)] = 1.0
        return logits
