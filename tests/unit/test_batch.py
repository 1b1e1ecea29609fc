"""LoRA segment building (`build_lora_batch_info`) and the `segments_from_batch_size` fault."""

from __future__ import annotations

import pytest
import torch

from lorainv.errors import AdapterNotResidentError, RequestError
from lorainv.impl.batch import SEGMENTS_FROM_BATCH_SIZE, ForwardBatch, build_lora_batch_info

RANKS = torch.tensor([0, 4, 8, 2])
SCALINGS = torch.tensor([0.0, 0.5, 2.0, 1.0], dtype=torch.float64)
FAULT = frozenset({SEGMENTS_FROM_BATCH_SIZE})


def build(slots, lens, faults=frozenset()):
    info = build_lora_batch_info(slots, lens, RANKS, SCALINGS, faults=faults)
    info.check_valid()
    return info


def as_lists(info):
    return info.num_segments, info.seg_lens.tolist(), info.seg_indptr.tolist(), info.weight_indices.tolist()


def test_distinct_slots_one_segment_each():
    info = build([1, 2, 0, 3], [3, 1, 4, 2])
    assert as_lists(info) == (4, [3, 1, 4, 2], [0, 3, 4, 8, 10], [1, 2, 0, 3])
    assert info.max_len == 4
    assert info.ranks is RANKS and info.scalings is SCALINGS


def test_identical_slots_merge_into_one_segment():
    info = build([2, 2, 2, 2, 2], [1, 5, 2, 1, 1])
    assert as_lists(info) == (1, [10], [0, 10], [2])
    assert info.max_len == 10


def test_alternating_slots_do_not_merge():
    info = build([1, 2, 1, 2, 1], [2, 2, 2, 2, 1])
    assert as_lists(info) == (5, [2, 2, 2, 2, 1], [0, 2, 4, 6, 8, 9], [1, 2, 1, 2, 1])


def test_runs_merge_only_when_consecutive():
    info = build([0, 0, 3, 1, 1, 1, 0], [1, 2, 7, 1, 1, 1, 5])
    assert as_lists(info) == (4, [3, 7, 3, 5], [0, 3, 10, 13, 18], [0, 3, 1, 0])
    assert info.max_len == 7


def test_decode_batch_lengths_are_one_per_request():
    info = build([1, 1, 2], [1, 1, 1])
    assert as_lists(info) == (2, [2, 1], [0, 2, 3], [1, 2])


def test_empty_batch_and_zero_length_requests():
    info = build([], [])
    assert as_lists(info) == (0, [], [0], [])
    assert info.max_len == 0
    info = build([1, 2], [0, 3])
    assert as_lists(info) == (2, [0, 3], [0, 0, 3], [1, 2])


def test_refuses_bad_input():
    with pytest.raises(AdapterNotResidentError, match="slot 4"):
        build([1, 4], [1, 1])
    with pytest.raises(RequestError, match="2 slots but 1"):
        build([1, 2], [1])
    with pytest.raises(RequestError, match="negative"):
        build([1], [-1])


@pytest.mark.parametrize(
    "slots",
    [[1, 1], [2, 2, 2], [0, 1, 1], [1, 2, 2, 3], [3, 0, 0]],
)
def test_fault_crashes_on_two_consecutive_requests_of_one_adapter(slots):
    lens = [2] * len(slots)
    correct = build(slots, lens)  # fine without the fault
    assert correct.num_segments < len(slots)
    with pytest.raises(RuntimeError, match=r"start \(0\) \+ length \(\d+\) exceeds dimension size"):
        build_lora_batch_info(slots, lens, RANKS, SCALINGS, faults=FAULT)


@pytest.mark.parametrize("slots", [[1], [1, 2], [1, 2, 1], [0, 3, 2, 1]])
def test_fault_is_silent_when_no_two_consecutive_requests_share_a_slot(slots):
    lens = list(range(1, len(slots) + 1))
    assert as_lists(build(slots, lens, FAULT)) == as_lists(build(slots, lens))


def test_forward_batch_check_valid():
    fb = ForwardBatch(
        mode="extend",
        input_ids=torch.tensor([5, 6, 7, 8]),
        positions=torch.tensor([2, 3, 4, 0]),
        rows=torch.tensor([3, 1]),
        prefix_lens=torch.tensor([2, 0]),
        extend_lens=torch.tensor([3, 1]),
        out_cache_loc=torch.tensor([9, 10, 11, 12]),
        lora=build([1, 1], [3, 1]),
    )
    fb.check_valid()
    assert fb.batch_size == 2
    fb.positions = torch.tensor([0, 1, 2, 0])
    with pytest.raises(AssertionError, match="positions"):
        fb.check_valid()
    fb.positions, fb.mode = torch.tensor([2, 3, 4, 0]), "decode"
    with pytest.raises(AssertionError, match="exactly one token"):
        fb.check_valid()
