"""The names of the injectable faults (docs/design.md §6), each with the historic bug it re-creates.

A leaf of the vocabulary: it imports nothing, so `lorainv.config` can validate
``faults=...`` without reaching into the runtime. Where each fault lives in the runtime is
`lorainv.impl.faults`' concern.
"""

from __future__ import annotations

FAULTS: dict[str, str] = {
    "stale_overlap_event": "loaded-state read from the event dict; a load whose requests were all "
    "cancelled is never reaped, so its slot stays busy forever",
    "session_double_count": "memory accounting counts a lent (active) session slot as session-held too",
    "retract_leaks_tail": "retraction does not free the request's last partial page / over-allocated tail",
    "segments_from_batch_size": "LoRA segment count taken from the batch size instead of unique_consecutive",
    "drainer_never_clears": "a drain mark is not cleared when its adapter has no running requests",
    "evict_in_batch_adapter": "LRU eviction may pick an adapter that the current batch uses, or a pinned one",
    "admission_ignores_staged_chunk": "LoRA admission ignores the staged chunked request and loads in flight",
    "abort_chunked_leaks_kv": "aborting a request mid chunked-prefill does not free its KV and row",
    "use_before_transfer": "the forward reads an adapter slot before its async copy is waited on",
    "pinned_cache_key_collision": "pinned host copies cached per weight name, without the rank/slice suffix",
    "stale_slot_tail": "a reused slot keeps the previous tenant's rank tail and absent modules",
    "nonresident_falls_back_to_slot0": "a non-resident adapter silently reads slot 0's weights",
}
