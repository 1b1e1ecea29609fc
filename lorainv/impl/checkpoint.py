"""Hugging Face Llama checkpoints on disk: ``config.json`` + ``model.safetensors`` or a sharded
``model.safetensors.index.json``. Read through safetensors only (never pickle)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorainv.errors import ConfigError
from lorainv.impl.llama_config import LlamaConfig

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``cfg`` must hold, with its shape (HF names, ``[out, in]``)."""
    h, q, kv, i = (
        cfg.hidden_size,
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
        cfg.intermediate_size,
    )
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path} is missing; a checkpoint needs config.json and model.safetensors") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not readable JSON: {e}") from e


def _weight_files(root: Path) -> dict[str, list[str]]:
    """Map each safetensors file of the checkpoint to the tensor names it is said to hold
    (an empty list means "whatever it holds", for the single-file layout)."""
    if (root / INDEX).exists():
        index = _read_json(root / INDEX)
        weight_map = index.get("weight_map") if isinstance(index, Mapping) else None
        if not isinstance(weight_map, Mapping):
            raise ConfigError(f"{root / INDEX}: field 'weight_map' is missing or not an object")
        files: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            files.setdefault(str(fname), []).append(str(name))
        return files
    if (root / SINGLE).exists():
        return {SINGLE: []}
    raise ConfigError(f"{root}: neither {SINGLE} nor {INDEX} exists")


def load_checkpoint(path: str | os.PathLike[str], dtype: torch.dtype) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Read and validate a checkpoint. Returns the config and every expected tensor in ``dtype``.

    Raises ``ConfigError`` naming the tensor when one is missing, has the wrong shape, or is not
    a Llama tensor (biases, unknown modules); names the field for an unsupported config.
    """
    root = Path(path)
    cfg = LlamaConfig.from_hf_dict(_read_json(root / "config.json"))
    shapes = expected_shapes(cfg)
    tensors: dict[str, torch.Tensor] = {}
    for fname, listed in _weight_files(root).items():
        fpath = root / fname
        if not fpath.exists():
            raise ConfigError(f"{root / INDEX} names {fname}, which is missing")
        try:
            with safe_open(str(fpath), framework="pt") as f:
                for name in listed or list(f.keys()):
                    if name.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and name == "lm_head.weight"):
                        continue
                    if name not in shapes:
                        raise ConfigError(f"{fname}: tensor {name!r} is not part of a Llama model; unsupported")
                    t = f.get_tensor(name)
                    if tuple(t.shape) != shapes[name]:
                        raise ConfigError(
                            f"{fname}: tensor {name!r} has shape {tuple(t.shape)}, expected {shapes[name]}"
                        )
                    tensors[name] = t.to(dtype=dtype, copy=True)  # owned, aligned memory (not the mmap)
        except ConfigError:
            raise
        except Exception as e:  # safetensors raises its own types for truncated/corrupt files
            raise ConfigError(f"{fpath} is not a readable safetensors file: {e}") from e
    for name in shapes:
        if name not in tensors:
            raise ConfigError(f"checkpoint {root}: tensor {name!r} is missing")
    return cfg, tensors


def save_checkpoint(
    path: str | os.PathLike[str],
    cfg: LlamaConfig,
    tensors: Mapping[str, torch.Tensor],
    *,
    num_shards: int = 1,
) -> None:
    """Write ``config.json`` and the tensors, in one file or ``num_shards`` files plus an index."""
    if num_shards < 1:
        raise ConfigError(f"num_shards={num_shards} must be >= 1")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    dtype_name = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (root / "config.json").write_text(json.dumps(cfg.to_hf_dict(dtype_name), indent=2) + "\n")
    owned = {k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}
    if num_shards == 1:
        save_file(owned, str(root / SINGLE), metadata={"format": "pt"})
        return
    names = sorted(owned)
    weight_map: dict[str, str] = {}
    for s in range(num_shards):
        fname = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: owned[n] for n in names[s::num_shards]}
        save_file(part, str(root / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, fname)
    total = sum(t.numel() * t.element_size() for t in owned.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / INDEX).write_text(json.dumps(index, indent=2) + "\n")
