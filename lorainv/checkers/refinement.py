"""Refinement: the runtime's pools must hold what the reference model predicts.

Not in ``all_checkers()`` by default, since it needs the model that observed the same
ops: ``all_checkers(extra=[RefinementChecker(model)])``.
"""

from __future__ import annotations

from lorainv.errors import Violation
from lorainv.model.reference import ReferenceModel
from lorainv.snapshot import Snapshot


class RefinementChecker:
    name = "refinement"

    def __init__(self, model: ReferenceModel) -> None:
        self.model = model

    def check(self, snap: Snapshot) -> list[Violation]:
        m = self.model
        out: list[Violation] = []
        live = {r.rid for r in snap.live()}
        if live != m.live():
            diff = sorted(live ^ m.live())
            out.append(Violation("refinement", "live", "live requests differ from the model", tuple(diff)))
        for r in snap.requests:
            want = m.s.reqs.get(r.rid)
            if want is None:
                out.append(Violation("refinement", "requests", f"{r.rid} unknown to the model", (r.rid,)))
                continue
            if r.state != want.state:
                out.append(Violation("refinement", "state", f"{r.rid} is {r.state}, model says {want.state}", (r.rid,)))
            held = len(r.indices) - r.cache_len
            if held != m.held(r.rid):
                out.append(
                    Violation(
                        "refinement", "held", f"{r.rid} holds {held} tokens, model predicts {m.held(r.rid)}", (r.rid,)
                    )
                )
        if snap.available != m.expected_available():
            out.append(
                Violation(
                    "refinement",
                    "free",
                    f"{snap.available} free tokens, model predicts {m.expected_available()} "
                    f"(cache {m.s.cache_tokens}, sessions {m.session_held()})",
                    (snap.available - m.expected_available(),),
                )
            )
        if snap.injected_failures is not None and sum(snap.injected_failures) != m.s.failures_injected:
            failed, armed = snap.injected_failures
            out.append(
                Violation(
                    "refinement",
                    "injected-failures",
                    f"the device failed {failed} copies and holds {armed} more armed, but FailTransfers ops "
                    f"asked for {m.s.failures_injected} in all",
                    (failed, armed),
                )
            )
        resident = dict(snap.lora.uid_to_slot)
        if resident != m.resident():
            out.append(
                Violation(
                    "refinement",
                    "resident",
                    f"resident adapters {resident} != model {m.resident()}",
                    tuple(sorted(set(resident) ^ set(m.resident()), key=repr)),
                )
            )
        loading = {ld.uid for ld in snap.lora.loads}
        if loading != m.s.loading:
            out.append(Violation("refinement", "loading", f"loads in flight {loading} != model {m.s.loading}"))
        if set(snap.lora.pinned) != m.s.pinned:
            out.append(Violation("refinement", "pinned", f"pins {set(snap.lora.pinned)} != model {m.s.pinned}"))
        if dict(snap.drainer.marks) != m.s.marks:
            out.append(Violation("refinement", "drain", f"drain marks {dict(snap.drainer.marks)} != model {m.s.marks}"))
        if set(snap.drainer.reserved) != m.s.reserved:
            out.append(
                Violation("refinement", "drain", f"reserved slots {snap.drainer.reserved} != model {m.s.reserved}")
            )
        return out
