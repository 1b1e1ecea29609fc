"""Shapes of the base network that LoRA adapters and pools must agree on."""

from __future__ import annotations

from dataclasses import dataclass

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Module groups as the kernels see them: name -> member modules, stacked in this order.
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
MODULE_GROUP = {m: g for g, ms in GROUPS.items() for m in ms}


@dataclass(frozen=True)
class ModelDims:
    """Llama-architecture sizes. Invariant: ``num_heads % num_kv_heads == 0``."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a target module."""
        h, q, kv, i = self.hidden_size, self.q_size, self.kv_size, self.intermediate_size
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[module]

    def group_in(self, group: str) -> int:
        return self.module_shape(GROUPS[group][0])[0]

    def group_out_sizes(self, group: str) -> tuple[int, ...]:
        return tuple(self.module_shape(m)[1] for m in GROUPS[group])
