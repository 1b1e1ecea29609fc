"""The Llama network: a paged, multi-LoRA forward and a plain full-sequence reference forward.

Numerics follow Hugging Face ``LlamaForCausalLM`` exactly: RMSNorm statistics and the RoPE
cos/sin tables are computed in float32 and cast to the model dtype, everything else runs in the
model dtype. So a float64 model matches HF float64 logits to ~1e-12, and two of our code paths
agree to the same level.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorainv.errors import ConfigError, RequestError
from lorainv.impl.backends.base import LoraBackend
from lorainv.impl.batch import ForwardBatch
from lorainv.impl.checkpoint import load_checkpoint, save_checkpoint
from lorainv.impl.dims import ModelDims
from lorainv.impl.llama_config import LlamaConfig
from lorainv.impl.lora_buffers import LoraBuffers

__all__ = ["KVCache", "LayerWeights", "LlamaConfig", "LlamaNetwork", "LoraLayers"]

# Per layer: group -> (A [S*r, in], B [sum(outs), r]), slices stacked as in lora_buffers.
LoraLayers = Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class KVCache:
    """Token-pool K/V memory: ``k[layer]``, ``v[layer]`` are ``[size, kv_heads, head_dim]``.

    Index 0 is padding and is never handed out by the token allocator.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def size(self) -> int:
        return int(self.k[0].shape[0])

    @classmethod
    def allocate(cls, cfg: LlamaConfig, size: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> KVCache:
        shape = (size, cfg.num_key_value_heads, cfg.head_dim)
        n = cfg.num_hidden_layers
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
        )


@dataclass
class LayerWeights:
    """One decoder layer, HF ``[out, in]`` layout; ``qkv`` stacks q|k|v rows and ``gate_up`` gate|up."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor

    def group(self, name: str) -> torch.Tensor:
        return {"qkv": self.qkv, "o": self.o, "gate_up": self.gate_up, "down": self.down}[name]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: statistics in float32, scaled by ``weight`` in the model dtype."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_tables(cfg: LlamaConfig, dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[max_position_embeddings, head_dim]`` computed in float32 as HF does (default RoPE)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim))
    freqs = torch.arange(cfg.max_position_embeddings, dtype=torch.float)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype=dtype, device=device), emb.sin().to(dtype=dtype, device=device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x ``[T, heads, head_dim]``; cos/sin ``[T, head_dim]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int) -> torch.Tensor:
    """Causal GQA attention of ``e`` queries at positions ``q_start..q_start+e-1`` over ``L`` keys.

    q ``[e, heads, d]``, k/v ``[L, kv_heads, d]`` -> ``[e, heads, d]``; query i sees keys ``<= q_start + i``.
    """
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * (q.shape[-1] ** -0.5)
    q_pos = q_start + torch.arange(q.shape[0], device=q.device)
    hidden = torch.arange(k.shape[0], device=q.device)[None, :] > q_pos[:, None]
    scores = scores.masked_fill(hidden[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=_acc(q.dtype)).to(q.dtype)
    return torch.einsum("hqk,khd->qhd", probs, v)


class LlamaNetwork:
    """Inference-only Llama (RMSNorm, RoPE, GQA, SwiGLU, tied or untied head).

    Invariants: every weight has the model dtype and device; ``lm_head is embed`` iff tied; the
    network is never mutated after construction (forward writes only into the given KV cache).
    """

    def __init__(
        self,
        config: LlamaConfig,
        embed: torch.Tensor,
        layers: list[LayerWeights],
        norm: torch.Tensor,
        lm_head: torch.Tensor | None,
    ) -> None:
        if (lm_head is None) != config.tie_word_embeddings:
            raise ConfigError("lm_head must be given iff tie_word_embeddings is false")
        self.config = config
        self.dims: ModelDims = config.dims()
        self.vocab_size = config.vocab_size
        self.max_context_len = config.max_position_embeddings
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = embed if lm_head is None else lm_head
        self.dtype = embed.dtype
        self.device = embed.device
        self.cos, self.sin = rope_tables(config, self.dtype, self.device)

    # ----------------------------------------------------------------- construction
    @classmethod
    def tiny(
        cls, seed: int = 0, dtype: torch.dtype = torch.float32, *, tie_word_embeddings: bool = False
    ) -> LlamaNetwork:
        """A tiny random Llama, deterministic from ``seed`` (own ``torch.Generator``; drawn in float64
        then cast, so every dtype holds the same model). Output projections are scaled so that
        greedy continuations vary with the prompt."""
        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            tie_word_embeddings=tie_word_embeddings,
        )
        gen = torch.Generator().manual_seed(seed)

        def rnd(*shape: int, std: float = 1.0) -> torch.Tensor:
            return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)

        def norm_w() -> torch.Tensor:
            return (1.0 + 0.1 * torch.randn(cfg.hidden_size, generator=gen, dtype=torch.float64)).to(dtype)

        d = cfg.dims()
        h, i = d.hidden_size, d.intermediate_size
        embed = rnd(d.vocab_size, h)
        layers = [
            LayerWeights(
                input_norm=norm_w(),
                qkv=rnd(d.q_size + 2 * d.kv_size, h, std=h**-0.5),
                o=rnd(h, d.q_size, std=d.q_size**-0.5),
                post_norm=norm_w(),
                gate_up=rnd(2 * i, h, std=h**-0.5),
                down=rnd(h, i, std=i**-0.5),
            )
            for _ in range(d.num_layers)
        ]
        norm = norm_w()
        lm_head = None if tie_word_embeddings else rnd(d.vocab_size, h, std=2.0 * h**-0.5)
        return cls(cfg, embed, layers, norm, lm_head)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> LlamaNetwork:
        """Load a HF Llama checkpoint (single or sharded safetensors); ``ConfigError`` names any
        missing/misshapen tensor or unsupported config field."""
        cfg, t = load_checkpoint(path, dtype)
        t = {k: v.to(device) for k, v in t.items()}
        layers = []
        for n in range(cfg.num_hidden_layers):
            p = f"model.layers.{n}."
            a, m = p + "self_attn.", p + "mlp."
            layers.append(
                LayerWeights(
                    input_norm=t[p + "input_layernorm.weight"],
                    qkv=torch.cat([t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"]]),
                    o=t[a + "o_proj.weight"],
                    post_norm=t[p + "post_attention_layernorm.weight"],
                    gate_up=torch.cat([t[m + "gate_proj.weight"], t[m + "up_proj.weight"]]),
                    down=t[m + "down_proj.weight"],
                )
            )
        lm_head = None if cfg.tie_word_embeddings else t["lm_head.weight"]
        return cls(cfg, t["model.embed_tokens.weight"], layers, t["model.norm.weight"], lm_head)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under their HF names (q/k/v and gate/up split back out)."""
        d = self.dims
        out = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        for n, w in enumerate(self.layers):
            p = f"model.layers.{n}."
            q, k, v = w.qkv.split([d.q_size, d.kv_size, d.kv_size])
            gate, up = w.gate_up.split([d.intermediate_size, d.intermediate_size])
            out |= {
                p + "input_layernorm.weight": w.input_norm,
                p + "self_attn.q_proj.weight": q,
                p + "self_attn.k_proj.weight": k,
                p + "self_attn.v_proj.weight": v,
                p + "self_attn.o_proj.weight": w.o,
                p + "post_attention_layernorm.weight": w.post_norm,
                p + "mlp.gate_proj.weight": gate,
                p + "mlp.up_proj.weight": up,
                p + "mlp.down_proj.weight": w.down,
            }
        if not self.config.tie_word_embeddings:
            out["lm_head.weight"] = self.lm_head
        return out

    def save_pretrained(self, path: str | os.PathLike[str], *, num_shards: int = 1) -> None:
        """Write the HF layout (``config.json`` + ``model.safetensors``, or shards + index)."""
        save_checkpoint(path, self.config, self.hf_state_dict(), num_shards=num_shards)

    # ----------------------------------------------------------------- requests
    def check_token_ids(self, ids: Sequence[int]) -> None:
        """Refuse a prompt holding an id outside ``[0, vocab_size)`` with ``RequestError``."""
        for pos, tok in enumerate(ids):
            if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < self.vocab_size:
                raise RequestError(
                    f"token id {tok!r} at position {pos} is outside the vocabulary [0, {self.vocab_size})"
                )

    # ----------------------------------------------------------------- paged forward
    @torch.no_grad()
    def forward(
        self,
        fb: ForwardBatch,
        kv: KVCache,
        req_to_token: torch.Tensor,
        lora: LoraBuffers | None,
        backend: LoraBackend | None,
    ) -> torch.Tensor:
        """Run the new tokens of a batch over the paged KV cache; return ``[B, vocab]`` logits of
        each request's last new token.

        Writes K/V of every new token at ``out_cache_loc`` in every layer. Request ``b`` attends
        over ``req_to_token[rows[b], :prefix_lens[b] + extend_lens[b]]``. LoRA is applied through
        ``backend`` iff ``fb.lora`` is set (then ``lora`` and ``backend`` are required).
        """
        use_lora = fb.lora is not None
        if use_lora and (lora is None or backend is None):
            raise ValueError("fb.lora is set but no LoraBuffers/backend was given")
        d = self.dims
        n_tok = int(fb.input_ids.shape[0])
        x = self.embed[fb.input_ids]
        cos, sin = self.cos[fb.positions], self.sin[fb.positions]
        loc = fb.out_cache_loc.long()
        rows, prefix, ext = fb.rows.tolist(), fb.prefix_lens.tolist(), fb.extend_lens.tolist()

        def proj(h: torch.Tensor, layer: int, group: str) -> torch.Tensor:
            out = h @ self.layers[layer].group(group).T
            if use_lora:
                assert lora is not None and backend is not None and fb.lora is not None
                out = backend.apply(
                    h, out, lora.A[layer][group], lora.B[layer][group], fb.lora, d.group_out_sizes(group)
                )
            return out

        eps = self.config.rms_norm_eps
        for n, w in enumerate(self.layers):
            h = rms_norm(x, w.input_norm, eps)
            q, k, v = proj(h, n, "qkv").split([d.q_size, d.kv_size, d.kv_size], dim=-1)
            q = apply_rope(q.reshape(n_tok, d.num_heads, d.head_dim), cos, sin)
            kv.k[n][loc] = apply_rope(k.reshape(n_tok, d.num_kv_heads, d.head_dim), cos, sin).to(kv.k[n].dtype)
            kv.v[n][loc] = v.reshape(n_tok, d.num_kv_heads, d.head_dim).to(kv.v[n].dtype)
            attn = torch.empty_like(q)
            start = 0
            for row, p, e in zip(rows, prefix, ext):
                idx = req_to_token[row, : p + e].long()
                keys, values = kv.k[n][idx].to(q.dtype), kv.v[n][idx].to(q.dtype)
                attn[start : start + e] = _attend(q[start : start + e], keys, values, p)
                start += e
            x = x + proj(attn.reshape(n_tok, d.q_size), n, "o")
            gate, up = proj(rms_norm(x, w.post_norm, eps), n, "gate_up").chunk(2, dim=-1)
            x = x + proj(F.silu(gate) * up, n, "down")
        last = torch.cumsum(fb.extend_lens.long(), 0) - 1
        return rms_norm(x[last], self.norm, eps) @ self.lm_head.T

    # ----------------------------------------------------------------- reference forward
    def merged_weight(self, layer: int, group: str, lora: LoraLayers | None, scaling: float) -> torch.Tensor:
        """``W + scaling * B_i A_i`` per slice i of ``group`` (a copy; ``W`` itself when no LoRA)."""
        w = self.layers[layer].group(group)
        if lora is None or group not in lora[layer]:
            return w
        a, b = lora[layer][group]
        outs = self.dims.group_out_sizes(group)
        r = int(b.shape[1])
        if tuple(a.shape) != (len(outs) * r, w.shape[1]) or tuple(b.shape) != (w.shape[0], r):
            raise ValueError(
                f"layer {layer} {group}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit W {tuple(w.shape)}"
            )
        w = w.clone()
        off = 0
        for i, width in enumerate(outs):
            delta = b[off : off + width].to(w.dtype) @ a[i * r : (i + 1) * r].to(w.dtype)
            w[off : off + width] += scaling * delta
            off += width
        return w

    @torch.no_grad()
    def reference_forward(
        self, tokens: Sequence[int], lora: LoraLayers | None = None, scaling: float = 1.0
    ) -> torch.Tensor:
        """Plain, non-paged, full-sequence forward from position 0 with merged LoRA weights;
        returns ``[len(tokens), vocab]`` logits. ``lora[layer]`` maps a group to ``(A [S*r, in],
        B [sum(outs), r])``; absent groups get no delta. Independent of the paged path (SDPA)."""
        self.check_token_ids(tokens)
        n = len(tokens)
        if not 0 < n <= self.max_context_len:
            raise RequestError(f"sequence length {n} must be in [1, {self.max_context_len}]")
        d = self.dims
        x = self.embed[torch.tensor(list(tokens), dtype=torch.long, device=self.device)]
        cos, sin = self.cos[:n], self.sin[:n]
        eps = self.config.rms_norm_eps
        for layer, w in enumerate(self.layers):
            h = rms_norm(x, w.input_norm, eps)
            q, k, v = (h @ self.merged_weight(layer, "qkv", lora, scaling).T).split(
                [d.q_size, d.kv_size, d.kv_size], -1
            )
            q = apply_rope(q.reshape(n, d.num_heads, d.head_dim), cos, sin).transpose(0, 1)
            k = apply_rope(k.reshape(n, d.num_kv_heads, d.head_dim), cos, sin).transpose(0, 1)
            v = v.reshape(n, d.num_kv_heads, d.head_dim).transpose(0, 1)
            rep = d.num_heads // d.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(n, d.q_size)
            x = x + attn @ self.merged_weight(layer, "o", lora, scaling).T
            gate, up = (rms_norm(x, w.post_norm, eps) @ self.merged_weight(layer, "gate_up", lora, scaling).T).chunk(
                2, -1
            )
            x = x + (F.silu(gate) * up) @ self.merged_weight(layer, "down", lora, scaling).T
        return rms_norm(x, self.norm, eps) @ self.lm_head.T

    reference_logits = reference_forward
