"""Traces (docs/design.md §7): a config, a seed and a list of ops, saved as JSON and replayed exactly.

Format::

    {"format": 1, "lorainv": "0.1.0", "config": {...RuntimeConfig...}, "seed": 0,
     "numeric": false, "ops": [{"op": "AddRequest", ...}, ...],
     "expect": {"pool": "kv", "invariant": "K3"} | null, "target": "lorainv"}

``target`` names the engine the trace ran on (`lorainv.targets`); a trace without it ran on
lorainv's own engine. Constructor options of the target, if any, are ``meta["target_options"]``.

Traces are written atomically (temp file + rename) and validated on load: every problem is
a `TraceError` naming the field. Files over ``MAX_TRACE_BYTES`` are refused unread.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorainv import __version__
from lorainv.config import RuntimeConfig
from lorainv.errors import ConfigError, TraceError
from lorainv.ops import Op

FORMAT = 1
MAX_TRACE_BYTES = 8 * 1024 * 1024
MAX_OPS = 100_000


@dataclass(frozen=True)
class Trace:
    config: RuntimeConfig
    ops: tuple[Op, ...]
    seed: int = 0
    numeric: bool = False
    expect: dict[str, str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    target: str = "lorainv"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "lorainv": __version__,
            "config": self.config.to_dict(),
            "seed": self.seed,
            "numeric": self.numeric,
            "ops": [op.to_dict() for op in self.ops],
            "expect": self.expect,
            "meta": self.meta,
            "target": self.target,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Trace:
        if not isinstance(data, dict):
            raise TraceError(f"trace must be a JSON object, got {type(data).__name__}")
        known = {"format", "lorainv", "config", "seed", "numeric", "ops", "expect", "meta", "target"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TraceError(f"trace: unknown field(s) {unknown}")
        for key in ("format", "config", "ops"):
            if key not in data:
                raise TraceError(f"trace: missing field {key!r}")
        if type(data["format"]) is not int or data["format"] != FORMAT:  # not true, not 1.0
            raise TraceError(f"trace: format {data['format']!r} is not supported (this lorainv reads format {FORMAT})")
        cfg = data["config"]
        if isinstance(cfg, dict) and "lora_drain_policy" not in cfg:
            # written before the preempt policy existed: replay the drainer those traces ran
            cfg = {**cfg, "lora_drain_policy": "admission"}
        try:
            config = RuntimeConfig.from_dict(cfg)
        except ConfigError as e:
            raise TraceError(f"trace.config: {e}{_user_fault_hint(cfg)}") from None
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TraceError(f"trace.seed must be an int, got {type(seed).__name__}")
        numeric = data.get("numeric", False)
        if not isinstance(numeric, bool):
            raise TraceError(f"trace.numeric must be a bool, got {type(numeric).__name__}")
        raw_ops = data["ops"]
        if not isinstance(raw_ops, list):
            raise TraceError(f"trace.ops must be a list, got {type(raw_ops).__name__}")
        if len(raw_ops) > MAX_OPS:
            raise TraceError(f"trace.ops has {len(raw_ops)} ops; at most {MAX_OPS}")
        ops = []
        for i, raw in enumerate(raw_ops):
            try:
                ops.append(Op.from_dict(raw))
            except TraceError as e:
                raise TraceError(f"trace.ops[{i}]: {e}") from None
        expect = data.get("expect")
        if expect is not None and (
            not isinstance(expect, dict) or not all(isinstance(v, str) for v in expect.values())
        ):
            raise TraceError("trace.expect must be null or an object of strings, e.g. {'pool': 'kv'}")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise TraceError("trace.meta must be an object")
        target = data.get("target", "lorainv")
        if not isinstance(target, str) or not target.isidentifier():
            raise TraceError(f"trace.target must be a target name such as 'lorainv' or 'vllm', got {target!r}")
        return cls(config, tuple(ops), seed, numeric, expect, meta, target)


def _user_fault_hint(cfg: Any) -> str:
    """A hint when the config names faults unknown here: they may be a user's own faults."""
    from lorainv.fault_names import FAULTS

    faults = cfg.get("faults") if isinstance(cfg, dict) else None
    if isinstance(faults, list) and any(isinstance(f, str) and f not in FAULTS for f in faults):
        return (
            "; a user fault is known only with its module: lorainv replay --checkers MODULE, "
            "or its installed lorainv.faults entry point"
        )
    return ""


def save(trace: Trace, path: str | os.PathLike[str]) -> Path:
    """Write ``trace`` atomically; returns the final path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".trace-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(trace.to_dict(), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike[str]) -> Trace:
    """Read and validate a trace file; every problem is a `TraceError`."""
    p = Path(path)
    try:
        st = p.stat()
    except (OSError, ValueError) as e:  # ValueError: an embedded NUL byte in the path
        raise TraceError(f"cannot read trace {p}: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(st.st_mode):  # a directory, a FIFO (would block) or a device (/dev/zero never ends)
        raise TraceError(f"cannot read trace {p}: not a regular file")
    if st.st_size > MAX_TRACE_BYTES:
        raise TraceError(f"trace {p} is {st.st_size} bytes; at most {MAX_TRACE_BYTES}")
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_TRACE_BYTES + 1)  # bounded even if the file grew since the stat
        if len(raw) > MAX_TRACE_BYTES:
            raise TraceError(f"trace {p} is over {MAX_TRACE_BYTES} bytes")
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"cannot read trace {p}: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TraceError(f"trace {p} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:  # nested too deeply, or an int with too many digits
        raise TraceError(f"trace {p} is not valid JSON: {e}") from None
    return Trace.from_dict(data)


def trace_dir() -> Path:
    return Path(os.environ.get("LORAINV_TRACE_DIR", ".lorainv/traces"))


def __getattr__(name: str) -> Any:
    """Compatibility aliases: replaying moved to `lorainv.testing.replay` (it needs the
    harness, which the trace format must not depend on). Import it from there."""
    if name in ("ReplayResult", "replay", "print_replay"):
        from lorainv.testing import replay as _replay

        return getattr(_replay, name)
    raise AttributeError(f"module 'lorainv.trace' has no attribute {name!r}")
