"""``lorainv generate``: serve a few mixed-adapter requests on the tiny model and print them.

Each prompt names its adapter (``--prompt ADAPTER:TEXT``). The "tokenizer" is bytes: a text's
UTF-8 bytes are its token ids (modulo the vocabulary), and an output is shown both as its ids
and as those ids decoded back to bytes and then to text (invalid UTF-8 replaced).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any, TextIO

from lorainv.cli.common import torch_threads
from lorainv.errors import LorainvError

BASE = "base"  # the adapter name that means "no adapter"
DEFAULT_TEXTS = ["The adapter said", "Multi-LoRA serving", "KV cache pressure", "hello"]


@dataclass(frozen=True)
class Job:
    """One request to serve: the adapter (None for the base model), the prompt ids, and the text
    it came from (None when given as ids)."""

    adapter: str | None
    ids: tuple[int, ...]
    text: str | None


def add_parser(sub: Any) -> None:
    """Add this command's subparser to ``sub``."""
    g = sub.add_parser(
        "generate",
        help="serve a few mixed-adapter requests and print their text",
        description="Serve prompts, each on the adapter it names, and print each output as text and token ids. "
        "Without --adapter, three generated adapters gen0, gen1, gen2 (ranks 8, 4, 16) are loaded; "
        f"'{BASE}' names the base model. Without prompts, a fixed demo sends each default prompt to two adapters. "
        "The tiny model's weights are random, so its text is noise; it is the same on every run, and each "
        "adapter changes it.",
        epilog=f"example: lorainv generate --prompt 'gen0:hello there' --prompt '{BASE}:hello there' "
        "--prompt-ids gen2:104,105",
    )
    g.add_argument(
        "--model", help="a Hugging Face Llama checkpoint directory (default: the embedded tiny random model)"
    )
    g.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="load the PEFT adapter in DIR as NAME (repeatable; replaces the generated gen0..gen2)",
    )
    g.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="ADAPTER:TEXT",
        help=f"a prompt and the adapter that serves it ('{BASE}' for none; repeatable); the text's UTF-8 bytes "
        "are its token ids; it may contain further colons",
    )
    g.add_argument(
        "--prompt-ids",
        action="append",
        default=[],
        metavar="ADAPTER:1,2,3",
        help="a prompt given as token ids, and its adapter (repeatable)",
    )
    g.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate per prompt")
    g.add_argument("--backend", choices=["torch_native", "triton"], default="torch_native", help="LoRA kernels")
    g.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="model dtype")


def _split(spec: str, option: str, adapters: list[str]) -> tuple[str | None, str]:
    """``ADAPTER:REST`` -> (adapter or None for the base model, REST); a usage error names the choices."""
    name, sep, rest = spec.partition(":")
    choices = [BASE, *adapters]
    if not sep or name not in choices:
        raise LorainvError(
            f"{option} expects ADAPTER:..., with ADAPTER one of {', '.join(choices)}; got {spec!r} "
            f"(for text with a colon on the base model write {BASE}:TEXT)"
        )
    return (None if name == BASE else name), rest


def parse_jobs(a: argparse.Namespace, adapters: list[str], vocab: int) -> list[Job]:
    """The requests to serve, in command-line order (``--prompt`` first, then ``--prompt-ids``); pure."""
    jobs: list[Job] = []
    for spec in a.prompt:
        ad, text = _split(spec, "--prompt", adapters)
        if not text:
            raise LorainvError(f"--prompt {spec!r}: the text is empty")
        jobs.append(Job(ad, tuple(b % vocab for b in text.encode()), text))
    for spec in a.prompt_ids:
        ad, rest = _split(spec, "--prompt-ids", adapters)
        try:
            ids = tuple(int(t) for t in rest.split(",") if t.strip())
        except ValueError:
            raise LorainvError(f"--prompt-ids {spec!r}: expected comma-separated integers after the colon") from None
        jobs.append(Job(ad, ids, None))
    if not jobs:  # the demo: every default prompt on two different adapters (or base)
        names: list[str | None] = [None, *adapters]
        for shift in (0, 1):
            for i, text in enumerate(DEFAULT_TEXTS):
                ids = tuple(b % vocab for b in text.encode())
                jobs.append(Job(names[(i + shift) % len(names)], ids, text))
    return jobs


def decode(ids: list[int] | tuple[int, ...]) -> str:
    """Token ids back to text: each id below 256 is a byte; the bytes are UTF-8 with invalid
    sequences replaced, an id of 256 or more is one replacement character, and a character
    that is not printable is shown as an escape (so noise cannot move the terminal's cursor)."""
    parts: list[str] = []
    run: list[int] = []
    for t in [*ids, None]:
        if t is not None and 0 <= t < 256:
            run.append(t)
            continue
        parts.append(bytes(run).decode("utf-8", errors="replace"))
        run = []
        if t is not None:
            parts.append("\ufffd")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in "".join(parts))


def run(a: argparse.Namespace, out: TextIO) -> int:
    """Serve the prompts; exit 1 if ``engine.check()`` reports a violation, 2 on a usage error."""
    torch_threads()
    from lorainv.config import RuntimeConfig
    from lorainv.impl.engine import Engine

    # --backend triton without a GPU or TRITON_INTERPRET=1: the engine's ConfigError names both (exit 2)
    cfg = RuntimeConfig(lora_backend=a.backend, dtype=a.dtype, device="cpu", max_total_tokens=4096)
    engine = Engine(cfg, model=a.model)
    adapters: list[str] = []
    if a.adapter:
        for spec in a.adapter:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise LorainvError(f"--adapter expects NAME=DIR, got {spec!r}")
            if name == BASE:
                raise LorainvError(f"--adapter {spec!r}: {BASE!r} names the base model; pick another name")
            engine.load_adapter(name, path)
            adapters.append(name)
    else:
        for i, rank in enumerate((8, 4, 16)):
            engine.load_adapter(f"gen{i}", f"gen:{rank}:{i + 1}")
            adapters.append(f"gen{i}")
    jobs = parse_jobs(a, adapters, engine.network.vocab_size)
    t0 = time.perf_counter()
    rids = [engine.add_request(list(j.ids), j.adapter, a.max_new_tokens) for j in jobs]
    steps = 0
    while not engine.is_idle():
        engine.step()
        steps += 1
    dt = time.perf_counter() - t0
    model = a.model or f"tiny random Llama (seed {cfg.seed}, {engine.network.dims.num_layers} layers)"
    out.write(f"lorainv generate — model {model}, backend {cfg.lora_backend}, adapters: {', '.join(adapters)}\n")
    out.write("tokens are bytes: ids < 256 decode as UTF-8 (invalid bytes shown as \ufffd)\n\n")
    width = max(len(BASE), *map(len, adapters))
    for rid, j in zip(rids, jobs):
        outs = engine.output(rid)
        prompt = repr(j.text) if j.text is not None else f"ids {list(j.ids)}"
        out.write(f"{rid:<4} {j.adapter or BASE:<{width}}  prompt {prompt}\n")
        out.write(f'{"":<4} {"":<{width}}  output "{decode(outs)}"  ids {outs}\n')
    ntok = sum(len(engine.output(r)) for r in rids)
    out.write(f"\n{len(rids)} requests, {ntok} tokens in {steps} scheduler steps, {dt:.2f}s wall\n")
    violations = engine.check()
    out.write("invariants: clean\n" if not violations else f"invariants: {len(violations)} violation(s)\n")
    for v in violations:
        out.write(f"  {v.pool}/{v.invariant}: {v.message}\n")
    return 0 if not violations else 1
