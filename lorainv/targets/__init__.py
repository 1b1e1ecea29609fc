"""Targets: engines lorainv can drive and check (the protocol is `lorainv.targets.base`).

Two targets ship: ``lorainv`` (lorainv's own `Engine`, `lorainv.targets.lorainv`) and
``vllm`` (vLLM 0.33.0's real v1 ``Scheduler`` + ``KVCacheManager`` on the CPU,
`lorainv.targets.vllm`; install it with ``ci/install-vllm.sh``).

Writing a target for another engine, with the vLLM target as the worked example:

1. **Construct the engine from a `RuntimeConfig`.** Map lorainv's knobs onto the engine's
   (page_size -> block size, max_total_tokens -> pool size, ...) and write the mapping down,
   including every lower bound the engine imposes (vLLM needs max_num_batched_tokens >=
   max_num_seqs). Replace the model by lorainv's token oracle: sample
   ``next_token(identity of the adapter's weights, the request's tokens as the engine holds
   them)`` from `lorainv.model.token_oracle`, so the harness can judge every token.
2. **apply(op) -> events.** Validate first and return one `Rejected` event for bad input,
   changing nothing; then call the engine's public API only (vLLM: ``add_request``,
   ``finish_requests``, ``schedule``, ``update_from_output``) and report what happened in
   lorainv's event vocabulary (`lorainv.events`). Say how the engine's notions map (vLLM's
   mixed steps become a prefill batch with `Scheduled` chunks and a decode batch).
3. **snapshot() -> a frozen view**, read from the engine's objects without calling anything
   that allocates, touches or evicts (`lorainv.targets.vllm_snapshot`).
4. **checkers()**: the invariants of that snapshot, each stating what it assumes about the
   engine (`lorainv.checkers.vllm_blocks`), and optionally **make_model()**: a reference model
   of the lifecycle in the engine's terms with a refinement checker
   (`lorainv.targets.vllm_model`).
5. **capabilities**: the ops it supports (the fuzzer generates only these), its pools and
   checkers, and whether lorainv's reference model, policy checks and token oracle apply.
6. Register a factory in `lorainv.targets.base.TARGETS`; then ``lorainv fuzz --target NAME``,
   ``lorainv replay`` (traces record their target) and ``Harness(cfg, target=NAME)`` use it.

Prove the checkers with planted bugs (monkeypatch the engine in a test, as
``tests/targets/test_vllm_target.py`` does) before trusting a clean run.
"""

from lorainv.targets.base import TARGETS, Capabilities, Target, make_target, target_names

__all__ = ["TARGETS", "Capabilities", "Target", "make_target", "target_names"]
