"""``lorainv generate``: serve a few mixed-adapter requests on the tiny model and print them."""

from __future__ import annotations

import argparse
import time
from typing import Any, TextIO

from lorainv.cli.common import torch_threads
from lorainv.errors import LorainvError

DEFAULT_PROMPTS = ["The adapter said", "Multi-LoRA serving", "KV cache pressure", "hello"]


def add_parser(sub: Any) -> None:
    """Add this command's subparser to ``sub``."""
    g = sub.add_parser("generate", help="serve a few mixed-adapter requests and print their tokens")
    g.add_argument("--model", help="Hugging Face Llama checkpoint dir (default: the embedded tiny model)")
    g.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="PEFT adapter (repeatable)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt-ids", action="append", metavar="1,2,3", help="token ids (repeatable)")
    src.add_argument("--prompt", action="append", metavar="TEXT", help="text; bytes map to ids (repeatable)")
    g.add_argument("--max-new-tokens", type=int, default=8)
    g.add_argument("--backend", choices=["torch_native", "triton"], default="torch_native")
    g.add_argument("--dtype", choices=["float32", "float64"], default="float32")


def run(a: argparse.Namespace, out: TextIO) -> int:
    """Serve the prompts; exit 1 if ``engine.check()`` reports a violation."""
    torch_threads()
    from lorainv.config import RuntimeConfig
    from lorainv.impl.engine import Engine

    cfg = RuntimeConfig(lora_backend=a.backend, dtype=a.dtype, device="cpu", max_total_tokens=4096)
    engine = Engine(cfg, model=a.model)
    names: list[str | None] = [None]
    if a.adapter:
        for spec in a.adapter:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise LorainvError(f"--adapter expects NAME=DIR, got {spec!r}")
            engine.load_adapter(name, path)
            names.append(name)
    else:
        for i, rank in enumerate((8, 4, 16)):
            name = f"gen{i}"
            engine.load_adapter(name, f"gen:{rank}:{i + 1}")
            names.append(name)
    vocab = engine.network.vocab_size
    if a.prompt_ids:
        prompts = [[int(t) for t in s.split(",") if t.strip()] for s in a.prompt_ids]
    else:
        texts = a.prompt or DEFAULT_PROMPTS
        prompts = [[b % vocab for b in t.encode()] for t in texts]
    jobs = [(p, names[i % len(names)]) for i, p in enumerate(prompts)]
    if not a.prompt_ids and not a.prompt:
        jobs += [(p, names[(i + 1) % len(names)]) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    rids = [engine.add_request(p, ad, a.max_new_tokens) for p, ad in jobs]
    steps = 0
    while not engine.is_idle():
        engine.step()
        steps += 1
    dt = time.perf_counter() - t0
    model = a.model or f"tiny (seed {cfg.seed}, {engine.network.dims.num_layers} layers)"
    out.write(f"lorainv generate — model {model}, backend {cfg.lora_backend}, {len(names) - 1} adapter(s)\n\n")
    out.write(f"{'req':<5} {'adapter':<10} {'prompt':<28} output tokens\n")
    out.write(f"{'-' * 5} {'-' * 10} {'-' * 28} {'-' * 40}\n")
    for rid, (p, ad) in zip(rids, jobs):
        shown = ",".join(map(str, p))
        shown = shown if len(shown) <= 28 else shown[:25] + "..."
        out.write(f"{rid:<5} {ad or '(base)':<10} {shown:<28} {engine.output(rid)}\n")
    ntok = sum(len(engine.output(r)) for r in rids)
    out.write(f"\n{len(rids)} requests, {ntok} tokens in {steps} scheduler steps, {dt:.2f}s wall\n")
    violations = engine.check()
    out.write("invariants: clean\n" if not violations else f"invariants: {len(violations)} violation(s)\n")
    return 0 if not violations else 1
