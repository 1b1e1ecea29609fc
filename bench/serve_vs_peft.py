"""lorainv serving vs Hugging Face transformers + PEFT on the same mixed-adapter greedy workload.

Both sides load the same files: a random Llama checkpoint written by transformers
(``save_pretrained``) and 8 LoRA adapters written by PEFT (``get_peft_model(...)
.save_pretrained``, random A and B, ranks 8 and 16 alternating, all seven projections).
The same prompts (random ids, mixed lengths) each name an adapter, round robin over the 8
adapters and the base model; every request decodes ``max_new_tokens`` greedy tokens.

* lorainv: ``Engine(RuntimeConfig(...), model=ckpt_dir)`` with the adapters loaded from
  their PEFT directories, then ``Engine.generate(prompts, adapters)`` (continuous batching,
  one mixed-adapter batch, torch-native LoRA backend, prefix cache off);
* HF + PEFT: ``PeftModel`` with all adapters loaded, one left-padded batch through
  ``model.generate(..., adapter_names=[...], do_sample=False)``.

Timing: end-to-end wall time of that one call, after one untimed warm-up on each side,
median over repeats, alternating sides; tokens/s = requests x max_new_tokens / time. Both
run float32 on one torch thread. Outputs: the timed float32 runs are compared token for
token (float32 may flip a near-tie, so a match rate is reported), and both sides are run
again in float64, where the greedy outputs must be equal.

Needs the ``[hf]`` extra. Run ``python -m bench.serve_vs_peft [--quick]``; writes
``bench/results/serve_vs_peft.json``.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import common

NAME = "serve_vs_peft"
N_ADAPTERS = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


FULL = Shape(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=2, vocab=1024)
QUICK = Shape(hidden=128, intermediate=344, layers=2, heads=4, kv_heads=2, vocab=512)


def _require_hf() -> tuple[Any, Any] | None:
    try:
        import peft
        import transformers
    except ImportError:
        return None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers, peft


def build_files(root: Path, shape: Shape, seed: int) -> tuple[Path, list[Path]]:
    """Write the HF checkpoint and the 8 PEFT adapters; returns their directories."""
    transformers, peft = _require_hf() or (None, None)
    assert transformers is not None and peft is not None
    cfg = transformers.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        base = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, prm in base.named_parameters():
            if name.endswith("norm.weight"):
                prm.copy_(1.0 + 0.1 * torch.randn(prm.shape, generator=gen))
            else:
                scale = 2.0 if name == "lm_head.weight" else 1.0  # varied greedy continuations
                prm.copy_(torch.randn(prm.shape, generator=gen) * scale / math.sqrt(prm.shape[-1]))
    ckpt = root / "base"
    base.save_pretrained(ckpt)
    adapters = []
    for i in range(N_ADAPTERS):
        r = 8 if i % 2 == 0 else 16
        lcfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0)
        with torch.random.fork_rng():
            pm = peft.get_peft_model(copy.deepcopy(base), lcfg)
        with torch.no_grad():
            for name, prm in pm.named_parameters():
                if "lora_" in name:  # PEFT zero-initialises B: give both factors random values
                    prm.copy_(torch.randn(prm.shape, generator=gen) * 0.5 / math.sqrt(prm.shape[-1]))
        path = root / f"ad{i}"
        pm.save_pretrained(path)
        adapters.append(path)
    return ckpt, adapters


def workload(n: int, vocab: int, seed: int) -> tuple[list[list[int]], list[str | None]]:
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(n):
        length = int(torch.randint(8, 49, (1,), generator=gen))
        prompts.append(torch.randint(1, vocab, (length,), generator=gen).tolist())
    names: list[str | None] = [None, *(f"ad{i}" for i in range(N_ADAPTERS))]
    return prompts, [names[i % len(names)] for i in range(n)]


class LorainvSide:
    def __init__(self, ckpt: Path, adapters: Sequence[Path], n: int, dtype: str) -> None:
        from lorainv.config import RuntimeConfig
        from lorainv.impl.engine import Engine

        cfg = RuntimeConfig(
            device="cpu",
            dtype=dtype,
            max_loras_per_batch=N_ADAPTERS + 1,
            max_lora_rank=16,
            max_running_requests=max(n, 1),
            max_total_tokens=max(4096, n * 128),
            chunked_prefill_size=max(4096, n * 64),
            enable_prefix_cache=False,  # repeats re-send the same prompts: no cache hits
        )
        self.engine = Engine(cfg, model=ckpt)
        for i, path in enumerate(adapters):
            self.engine.load_adapter(f"ad{i}", path)

    def run(self, prompts: list[list[int]], names: list[str | None], new: int) -> list[list[int]]:
        return self.engine.generate(prompts, names, max_new_tokens=new)


class HfSide:
    def __init__(self, ckpt: Path, adapters: Sequence[Path], dtype: torch.dtype) -> None:
        transformers, peft = _require_hf() or (None, None)
        assert transformers is not None and peft is not None
        base = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base, adapters[0], adapter_name="ad0")
        for i, path in enumerate(adapters[1:], start=1):
            model.load_adapter(path, adapter_name=f"ad{i}")
        self.model = model.to(dtype).eval()  # cast after loading: adapter weights in the same dtype

    def run(self, prompts: list[list[int]], names: list[str | None], new: int) -> list[list[int]]:
        width = max(map(len, prompts))
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding, as generation needs
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                adapter_names=[n if n is not None else "__base__" for n in names],
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        return out[:, width:].tolist()


@dataclass
class Result:
    shape: dict[str, int]
    requests: int
    max_new_tokens: int
    repeats: int
    lorainv_s: float
    hf_peft_s: float
    lorainv_tok_s: float
    hf_peft_tok_s: float
    ratio: float  # lorainv tokens/s over HF + PEFT tokens/s
    f32_match_rate: float  # requests whose float32 greedy outputs are identical
    f64_equal: bool
    f64_mismatches: list[int]
    adapters_change_outputs: float  # adapter requests whose f64 output differs from the base model's
    lorainv_repeats_s: list[float]
    hf_repeats_s: list[float]
    adapters_per_batch: int


def match_rate(a: list[list[int]], b: list[list[int]]) -> tuple[float, list[int]]:
    bad = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    return 1.0 - len(bad) / len(a), bad


def measure(shape: Shape, n: int, new: int, repeats: int, seed: int) -> Result:
    prompts, names = workload(n, shape.vocab, seed)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, adapters = build_files(Path(tmp), shape, seed)
        ours, theirs = LorainvSide(ckpt, adapters, n, "float32"), HfSide(ckpt, adapters, torch.float32)
        out_ours, out_hf = ours.run(prompts, names, new), theirs.run(prompts, names, new)  # warm-up
        t_ours, t_hf = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            got = ours.run(prompts, names, new)
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            want = theirs.run(prompts, names, new)
            t_hf.append(time.perf_counter() - t0)
            if got != out_ours or want != out_hf:
                raise RuntimeError("a side is not deterministic across repeats")
        rate32, _ = match_rate(out_ours, out_hf)
        del ours, theirs
        f64_ours = LorainvSide(ckpt, adapters, n, "float64").run(prompts, names, new)
        f64_hf = HfSide(ckpt, adapters, torch.float64).run(prompts, names, new)
        _, bad64 = match_rate(f64_ours, f64_hf)
        base64 = LorainvSide(ckpt, adapters, n, "float64").run(prompts, [None] * n, new)
        lora_idx = [i for i, a in enumerate(names) if a is not None]
        changed = sum(f64_ours[i] != base64[i] for i in lora_idx) / max(len(lora_idx), 1)
    lo, hf = common.median(t_ours), common.median(t_hf)
    tokens = n * new
    return Result(
        asdict(shape),
        n,
        new,
        repeats,
        round(lo, 4),
        round(hf, 4),
        round(tokens / lo, 1),
        round(tokens / hf, 1),
        round(hf / lo, 3),
        round(rate32, 4),
        not bad64,
        bad64,
        round(changed, 3),
        [round(x, 4) for x in t_ours],
        [round(x, 4) for x in t_hf],
        len(set(names)),
    )


def render(results: Sequence[Result]) -> str:
    head = ["shape (h/i/L/heads/kv)", "reqs", "new", "lorainv tok/s", "HF+PEFT tok/s", "ratio", "f32 match"]
    head += ["f64 equal", "LoRA changes"]
    rows = []
    for r in results:
        s = r.shape
        shape = f"{s['hidden']}/{s['intermediate']}/{s['layers']}/{s['heads']}/{s['kv_heads']}"
        equal = "yes" if r.f64_equal else f"NO {r.f64_mismatches}"
        rates = [f"{r.lorainv_tok_s:.0f}", f"{r.hf_peft_tok_s:.0f}", f"{r.ratio:.2f}x", f"{r.f32_match_rate:.0%}"]
        rows.append([shape, r.requests, r.max_new_tokens, *rates, equal, f"{r.adapters_change_outputs:.0%}"])
    return common.table(head, rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(NAME, __doc__)
    p.add_argument("--requests", default=None, help="concurrent request counts (default 16,64; quick 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="greedy tokens per request (default 16, quick 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per side (default 3, quick 2)")
    p.add_argument("--tiny", action="store_true", help="an even smaller model (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if _require_hf() is None:
        print("serve_vs_peft needs transformers and peft: pip install -e '.[hf]' (skipped; nothing written)")
        return 2
    counts = [int(x) for x in (args.requests or ("16" if args.quick else "16,64")).split(",")]
    new = args.new_tokens or (8 if args.quick else 16)
    repeats = args.repeats or (2 if args.quick else 3)
    if min(counts) < 1 or new < 1 or repeats < 1:
        p.error("--requests, --new-tokens and --repeats must be >= 1")
    shape = Shape(64, 128, 2, 4, 2, 256) if args.tiny else QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    t0 = time.perf_counter()
    results = [measure(shape, n, new, repeats, args.seed) for n in counts]
    elapsed = time.perf_counter() - t0
    print(f"serve_vs_peft — greedy mixed-adapter generation, float32 ({common.MACHINE_NOTE}; torch threads 1)\n")
    print(render(results))
    print("\nratio = lorainv tokens/s / HF+PEFT tokens/s (end to end, prefill included; median of repeats);")
    print("LoRA changes = adapter requests whose float64 output differs from the base model's (adapters matter)")
    doc = {
        "quick": args.quick,
        "torch_threads": args.threads,
        "elapsed_s": round(elapsed, 2),
        "method": "same HF checkpoint and PEFT adapter dirs, same prompts; lorainv Engine.generate vs "
        "PeftModel.generate(adapter_names=...) greedy; float32 timed, float64 equality check",
        "results": [asdict(r) for r in results],
    }
    path = common.write_json(args.out, NAME, doc)
    ok = all(r.f64_equal for r in results)
    print(f"\nfloat64 outputs equal: {'yes' if ok else 'NO'}; {elapsed:.1f} s; wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
