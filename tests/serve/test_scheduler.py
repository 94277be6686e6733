"""The continuous-batching scheduler without a model: FCFS within priorities, slot and token limits, admission
control, aborts that free slots, and a fake runner that drives requests to completion."""

import pytest

from glmkit.config import SpecialTokens
from glmkit.generate.config import GenerationConfig
from glmkit.serve.request import Request
from glmkit.serve.scheduler import QueueFullError, Scheduler, SchedulerConfig

SPECIAL = SpecialTokens(eos=0, pad=0, sop=1, eop=2, cls=3, mask=4, gmask=7, smask=8)


def req(rid, n_prompt=3, max_new=4, priority=0, fill="first", prompt=None):
    prompt = prompt or [3] + [20 + i for i in range(n_prompt - 2)] + [7]
    config = GenerationConfig(max_new_tokens=max_new)
    return Request(rid, prompt, config, special=SPECIAL, max_sequence_length=64, fill=fill, priority=priority)


def run_fake(sched, token=9):
    """Step until idle, sampling ``token`` for every request; returns the admission order and the step count."""
    admitted, steps = [], 0
    while sched.has_requests():
        out = sched.schedule()
        admitted += [r.request_id for r in out.prefill]
        assert len(out.decode) <= sched.config.max_num_seqs and out.num_tokens <= sched.config.max_num_batched_tokens
        assert len({r.slot for r in out.decode}) == len(out.decode)
        sampled = {r.request_id: (token, None) for r in out.decode if r.samples_this_step()}
        sched.update_from_output(out, sampled)
        steps += 1
    return admitted, steps


def test_fcfs_within_priority_levels_and_slots_reused():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=32))
    for rid, prio in [("a", 1), ("b", 0), ("c", 1), ("d", 0), ("e", 2)]:
        sched.add_request(req(rid, priority=prio))
    admitted, steps = run_fake(sched)
    assert admitted == ["b", "d", "a", "c", "e"]
    assert steps == 12  # three waves of 4 tokens
    assert sched.num_free_slots == 2 and not sched.running


def test_new_requests_join_at_every_step():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32))
    sched.add_request(req("long", max_new=10))
    out = sched.schedule()
    sched.update_from_output(out, {"long": (9, None)})
    sched.add_request(req("short", max_new=2))
    out = sched.schedule()
    assert [r.request_id for r in out.prefill] == ["short"] and len(out.decode) == 2


def test_token_budget_limits_prefill_per_step():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=12, max_model_len=32))
    for rid in "abc":
        sched.add_request(req(rid, n_prompt=5))  # 5 prompt tokens + <sop> = 6 tokens each
    first = sched.schedule()
    assert [r.request_id for r in first.prefill] == ["a", "b"] and first.num_tokens == 12
    sched.update_from_output(first, {r.request_id: (9, None) for r in first.decode})
    second = sched.schedule()
    assert [r.request_id for r in second.prefill] == ["c"] and second.num_tokens == 2 + 6


def test_admission_control():
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=16, max_model_len=20, max_queue_size=2))
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_request(req("big", n_prompt=10, max_new=15))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        sched.add_request(req("wide", n_prompt=17, max_new=1))
    sched.add_request(req("a"))
    sched.add_request(req("b"))
    with pytest.raises(QueueFullError, match="Exceeds maximum queue size"):
        sched.add_request(req("c"))
    with pytest.raises(ValueError, match="already"):
        sched.add_request(req("a"))


def test_abort_frees_slot_and_queue_entry():
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=16, max_model_len=20, max_queue_size=1))
    sched.add_request(req("a", max_new=8))
    out = sched.schedule()
    sched.add_request(req("b"))
    aborted = sched.finish_requests(["a", "b", "unknown"])
    assert [r.finish_reason for r in aborted] == ["abort", "abort"]
    sched.update_from_output(out, {"a": (9, None)})  # the step that was running when "a" was aborted
    assert sched.num_free_slots == 1 and sched.num_waiting == 0 and not sched.has_requests()
    sched.add_request(req("c"))
    assert [r.request_id for r in sched.schedule().prefill] == ["c"]


def test_multi_blank_request_feeds_catch_up_token_between_spans():
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=16, max_model_len=40))
    r = req("m", max_new=2, fill="all", prompt=[3, 20, 4, 21, 4, 0])
    sched.add_request(r)
    inputs = []
    while sched.has_requests():
        out = sched.schedule()
        inputs.append(r.next_input())
        sched.update_from_output(out, {"m": (9, None)} if r.samples_this_step() else {})
    # span 1 at blank 2: <sop>, 9 ; the cut span's last 9 is fed before span 2's <sop> at blank 4
    assert inputs == [(1, 2, 1), (9, 2, 2), (9, 2, 3), (1, 4, 1), (9, 4, 2)]
    assert r.spans == [[9, 9], [9, 9]] and r.finish_reason == "length"
