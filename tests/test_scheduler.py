"""Scheduling policy against the Scheduler class directly: token budget, chunked prefill,
decode priority, preemption order, abort."""

import pytest

from services.sampling_params import SamplingParams
from services.scheduler.request import Request, Status
from services.scheduler.scheduler import Scheduler, SchedulerConfig
from services.step import StepOutput, WorkerCapacity


def make(num_blocks=64, block_size=4, budget=16, max_seqs=8, max_len=256, caching=True) -> Scheduler:
    cap = WorkerCapacity(num_blocks, block_size, max_len, "float32", "cpu", 1000, [2])
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, enable_prefix_caching=caching),
        cap,
    )


def add(s: Scheduler, rid: str, n: int, max_tokens=8, start=10) -> Request:
    r = Request.new(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens), [2])
    s.add(r)
    return r


def run_step(s: Scheduler, token: int = 7):
    step = s.schedule()
    # a fake worker: every request whose scheduled tokens reach its end samples `token`
    ids = [
        rid
        for rid, n in step.num_scheduled_tokens.items()
        if s.requests[rid].num_computed_tokens + n == s.requests[rid].num_tokens
    ]
    s.update(step, StepOutput(step.step_id, ids, [token] * len(ids), [None] * len(ids)))
    return step


def test_budget_chunks_long_prefill_and_shares_step_with_decodes():
    s = make(budget=16)
    a = add(s, "a", 6)
    step = run_step(s)
    assert step.num_scheduled_tokens == {"a": 6}
    assert a.num_output_tokens == 1
    b = add(s, "b", 40, start=100)
    step = run_step(s)
    # the running decode goes first, the new prompt gets the rest of the budget as a chunk
    assert step.num_scheduled_tokens == {"a": 1, "b": 15}
    assert b.num_computed_tokens == 15 and b.num_output_tokens == 0
    step = run_step(s)
    assert step.num_scheduled_tokens == {"a": 1, "b": 15}
    step = run_step(s)
    assert step.num_scheduled_tokens == {"a": 1, "b": 10}
    assert b.num_output_tokens == 1  # sampled only once its whole prompt was computed


def test_max_num_seqs_limits_running():
    s = make(max_seqs=2, budget=100)
    for i in range(3):
        add(s, str(i), 4)
    step = run_step(s)
    assert set(step.num_scheduled_tokens) == {"0", "1"}
    assert [r.req_id for r in s.waiting] == ["2"]


def test_new_requests_carry_blocks_and_cached_ones_only_new_blocks():
    s = make(block_size=4, budget=100)
    add(s, "a", 7)
    step = run_step(s)
    assert len(step.new_requests) == 1 and len(step.new_requests[0].block_ids) == 2
    step = run_step(s)  # token 8 fits the second block
    assert step.cached_requests[0].new_block_ids == []
    step = run_step(s)  # token 9 needs a third block
    assert len(step.cached_requests[0].new_block_ids) == 1


def test_preemption_takes_latest_admitted_and_recomputes_later():
    s = make(num_blocks=6, block_size=4, budget=100, max_seqs=8, max_len=24)
    a = add(s, "a", 8, max_tokens=16)
    b = add(s, "b", 8, max_tokens=16, start=200)
    c = add(s, "c", 8, max_tokens=16, start=400)
    run_step(s)  # each takes 2 blocks: the pool is full
    assert s.block_manager.num_free == 0
    step = run_step(s)  # a needs a third block: c (latest) is preempted
    assert c.status == Status.PREEMPTED and s.waiting[0] is c
    assert "c" in step.dropped_req_ids and "c" not in step.num_scheduled_tokens
    assert c.num_computed_tokens == 0 and c.block_ids == []
    assert s.num_preemptions >= 1
    assert a.status == Status.RUNNING
    # c keeps its generated token and comes back as a new request with prompt + output
    for _ in range(100):
        step = run_step(s)
        if c.status == Status.RUNNING:
            break
    resumed = [n for n in step.new_requests if n.req_id == "c"][0]
    assert resumed.token_ids == c.token_ids[: len(resumed.token_ids)]
    assert resumed.num_output_tokens == 1
    while s.has_work():  # everything still completes, with every block returned
        run_step(s)
    assert a.num_output_tokens == b.num_output_tokens == c.num_output_tokens == 16
    assert s.block_manager.num_free == 6


def test_finish_on_max_tokens_eos_and_stop_ids():
    s = make(budget=100)
    a = add(s, "a", 4, max_tokens=3)
    for _ in range(3):
        run_step(s)
    assert a.status == Status.FINISHED_LENGTH and "a" not in s.requests
    b = add(s, "b", 4)
    run_step(s, token=2)  # eos
    assert b.status == Status.FINISHED_STOPPED and b.stop_reason is None
    c = Request.new("c", [5, 6], SamplingParams(stop_token_ids=[9]), [2])
    s.add(c)
    run_step(s, token=9)
    assert c.status == Status.FINISHED_STOPPED and c.stop_reason == 9
    d = Request.new("d", [5, 6], SamplingParams(min_tokens=2, max_tokens=5), [2])
    s.add(d)
    run_step(s, token=2)  # eos before min_tokens does not stop
    assert d.status == Status.RUNNING
    run_step(s, token=2)
    assert d.status == Status.FINISHED_STOPPED
    assert s.block_manager.num_free == s.block_manager.num_blocks


def test_abort_frees_blocks_at_once_and_tells_worker():
    s = make(budget=100)
    add(s, "a", 10)
    run_step(s)
    assert s.block_manager.num_free < s.block_manager.num_blocks
    s.finish("a", Status.FINISHED_ABORTED)
    assert s.block_manager.num_free == s.block_manager.num_blocks
    assert s.schedule().dropped_req_ids == ["a"]
    add(s, "w", 5)
    s.finish("w", Status.FINISHED_ABORTED)  # aborting a waiting request
    assert not s.has_work()


def test_prefix_hit_skips_cached_tokens():
    s = make(block_size=4, budget=100)
    add(s, "a", 13)
    run_step(s)
    b = add(s, "b", 13)  # same prompt
    step = run_step(s)
    assert b.num_cached_tokens == 12
    assert step.num_scheduled_tokens["b"] == 1
    assert step.new_requests[0].num_computed_tokens == 12


def test_rejects_prompts_that_cannot_run():
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        make(num_blocks=4, block_size=4, max_len=64)
    s = make(num_blocks=16, block_size=4, max_len=64)
    with pytest.raises(ValueError, match="empty"):
        add(s, "e", 0)
    with pytest.raises(ValueError, match="max_model_len"):
        add(s, "long", 64)
    add(s, "ok", 5)
    with pytest.raises(ValueError, match="already in use"):
        add(s, "ok", 5)


def test_next_step_is_scheduled_before_the_last_output_arrives():
    """A remote worker gets step N+1 while N computes: the token N will sample is decoded in N+1
    without the scheduler knowing it yet, and nothing is scheduled past max_tokens."""
    s = make(budget=100)
    a = add(s, "a", 6, max_tokens=2)
    first = s.schedule()
    assert first.num_scheduled_tokens == {"a": 6} and a.num_pending == 1
    second = s.schedule()  # before first's output is back
    assert second.num_scheduled_tokens == {"a": 1}
    assert second.cached_requests[0].num_computed_tokens == 6  # where the worker's token 7 goes
    assert s.schedule().num_scheduled_tokens == {}  # two tokens pending already make max_tokens
    s.update(first, StepOutput(first.step_id, ["a"], [7], [None]))
    assert a.token_ids[-1] == 7 and a.num_computed_tokens == 6 and a.num_pending == 1
    events = s.update(second, StepOutput(second.step_id, ["a"], [8], [None]))
    assert events[-1].finished and a.status == Status.FINISHED_LENGTH and a.output_token_ids == [7, 8]
