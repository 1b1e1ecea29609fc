"""`LlamaConfig`: the network's shape and numerics, read from a Hugging Face ``config.json``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lorainv.errors import ConfigError
from lorainv.impl.dims import ModelDims

_ARCH = "LlamaForCausalLM"


def _need_int(d: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = d.get(name, default)
    if value is None:
        raise ConfigError(f"config.json: required field {name!r} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"config.json: field {name!r} must be a positive int, got {value!r}")
    return value


def _need_float(d: Mapping[str, Any], name: str, default: float) -> float:
    value = d.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"config.json: field {name!r} must be a positive number, got {value!r}")
    return float(value)


def _rope_theta(d: Mapping[str, Any]) -> float:
    """Accept ``rope_parameters`` (transformers >= 5) or legacy ``rope_theta`` + ``rope_scaling``;
    only the ``default`` rope type is served."""
    params = d.get("rope_parameters")
    if params is not None:
        if not isinstance(params, Mapping):
            raise ConfigError(f"config.json: field 'rope_parameters' must be an object, got {params!r}")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise ConfigError(
                f"config.json: rope_parameters.rope_type={kind!r} is not supported; only 'default' RoPE is served"
            )
        return _need_float(params, "rope_theta", float(d.get("rope_theta", 10000.0)))
    scaling = d.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, Mapping) else scaling
        if kind != "default":
            raise ConfigError(
                f"config.json: rope_scaling type {kind!r} is not supported; only 'default' RoPE (no scaling) is served"
            )
    return _need_float(d, "rope_theta", 10000.0)


@dataclass(frozen=True)
class LlamaConfig:
    """Llama-architecture hyper-parameters.

    Invariants: every size is positive, ``num_attention_heads % num_key_value_heads == 0`` and
    ``head_dim`` is even (RoPE rotates halves).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            _need_int({name: getattr(self, name)}, name)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("rms_norm_eps and rope_theta must be positive")

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """Parse a Hugging Face Llama ``config.json`` dict; anything we would serve wrongly is a
        ``ConfigError`` naming the field (architecture, activation, biases, RoPE type)."""
        archs = d.get("architectures")
        model_type = d.get("model_type")
        if archs:
            if not isinstance(archs, list) or _ARCH not in archs:
                raise ConfigError(f"config.json: architectures={archs!r} is not supported; only {_ARCH} is served")
        elif model_type != "llama":
            raise ConfigError(f"config.json: model_type={model_type!r} is not supported; only 'llama' is served")
        if model_type is not None and model_type != "llama":
            raise ConfigError(f"config.json: model_type={model_type!r} is not supported; only 'llama' is served")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config.json: hidden_act={act!r} is not supported; Llama uses 'silu'")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag, False):
                raise ConfigError(f"config.json: {flag}=true is not supported")
        hidden = _need_int(d, "hidden_size")
        heads = _need_int(d, "num_attention_heads")
        if d.get("head_dim") is None and hidden % heads:
            raise ConfigError(f"config.json: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
        tie = d.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise ConfigError(f"config.json: field 'tie_word_embeddings' must be a bool, got {tie!r}")
        return cls(
            vocab_size=_need_int(d, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_need_int(d, "intermediate_size"),
            num_hidden_layers=_need_int(d, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=_need_int(d, "num_key_value_heads", heads),
            head_dim=_need_int(d, "head_dim", hidden // heads),
            rms_norm_eps=_need_float(d, "rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(d),
            max_position_embeddings=_need_int(d, "max_position_embeddings", 2048),
            tie_word_embeddings=tie,
        )

    def to_hf_dict(self, dtype_name: str = "float32") -> dict[str, Any]:
        """A ``config.json`` dict that transformers (4.x and 5.x) loads as ``LlamaForCausalLM``."""
        return {
            "architectures": [_ARCH],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": dtype_name,
        }

    def dims(self) -> ModelDims:
        return ModelDims(
            num_layers=self.num_hidden_layers,
            hidden_size=self.hidden_size,
            num_heads=self.num_attention_heads,
            num_kv_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
        )
