"""Dataclass <-> protobuf, in one place. The dataclasses are what the engine uses; the protobuf
messages are what crosses a process boundary."""

from __future__ import annotations

from protos.pagemesh.v1 import common_pb2, worker_pb2
from services.sampling_params import SamplingParams
from services.step import CachedRequest, NewRequest, StepInput, StepOutput, TokenLogprobs, WorkerCapacity


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    """Raises ValueError naming the parameter when a value is out of range."""
    return SamplingParams(
        n=p.n or 1,
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k,
        min_p=p.min_p,
        seed=p.seed if p.HasField("seed") else None,
        max_tokens=p.max_tokens if p.HasField("max_tokens") else None,
        min_tokens=p.min_tokens,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        logprobs=p.logprobs if p.HasField("logprobs") else None,
        include_stop_str_in_output=p.include_stop_str_in_output,
        skip_special_tokens=p.skip_special_tokens if p.HasField("skip_special_tokens") else True,
    )


def sampling_to_proto(s: SamplingParams) -> common_pb2.SamplingParams:
    p = common_pb2.SamplingParams(
        n=s.n,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        min_tokens=s.min_tokens,
        stop=s.stop,
        stop_token_ids=s.stop_token_ids,
        ignore_eos=s.ignore_eos,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty,
        include_stop_str_in_output=s.include_stop_str_in_output,
        skip_special_tokens=s.skip_special_tokens,
    )
    if s.seed is not None:
        p.seed = s.seed
    if s.max_tokens is not None:
        p.max_tokens = s.max_tokens
    if s.logprobs is not None:
        p.logprobs = s.logprobs
    return p


def logprobs_to_proto(lp: TokenLogprobs, token_id: int) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=token_id,
        logprob=lp.logprob,
        rank=lp.rank,
        top=[
            common_pb2.TopLogprob(token_id=t, logprob=v)
            for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)
        ],
    )


def logprobs_from_proto(p: common_pb2.TokenLogprob) -> TokenLogprobs:
    return TokenLogprobs(p.logprob, p.rank, [t.token_id for t in p.top], [t.logprob for t in p.top])


def step_input_to_proto(s: StepInput) -> worker_pb2.StepInput:
    return worker_pb2.StepInput(
        step_id=s.step_id,
        new_requests=[
            worker_pb2.NewRequest(
                req_id=r.req_id,
                token_ids=r.token_ids,
                block_ids=r.block_ids,
                num_computed_tokens=r.num_computed_tokens,
                sampling=sampling_to_proto(r.sampling),
                num_output_tokens=r.num_output_tokens,
                traceparent=r.traceparent,
            )
            for r in s.new_requests
        ],
        cached_requests=[
            worker_pb2.CachedRequest(
                req_id=r.req_id, new_block_ids=r.new_block_ids, num_computed_tokens=r.num_computed_tokens
            )
            for r in s.cached_requests
        ],
        scheduled_req_ids=list(s.num_scheduled_tokens),
        num_scheduled_tokens=list(s.num_scheduled_tokens.values()),
        dropped_req_ids=s.dropped_req_ids,
    )


def step_input_from_proto(p: worker_pb2.StepInput) -> StepInput:
    return StepInput(
        step_id=p.step_id,
        new_requests=[
            NewRequest(
                r.req_id,
                list(r.token_ids),
                list(r.block_ids),
                r.num_computed_tokens,
                sampling_from_proto(r.sampling),
                r.num_output_tokens,
                r.traceparent,
            )
            for r in p.new_requests
        ],
        cached_requests=[
            CachedRequest(r.req_id, list(r.new_block_ids), r.num_computed_tokens) for r in p.cached_requests
        ],
        num_scheduled_tokens=dict(zip(p.scheduled_req_ids, p.num_scheduled_tokens, strict=True)),
        dropped_req_ids=list(p.dropped_req_ids),
    )


def step_output_to_proto(s: StepOutput) -> worker_pb2.StepOutput:
    out = worker_pb2.StepOutput(
        step_id=s.step_id, req_ids=s.req_ids, token_ids=s.token_ids, compute_seconds=s.compute_seconds
    )
    for i, (lp, token) in enumerate(zip(s.logprobs, s.token_ids, strict=True)):
        if lp is not None:
            out.logprob_index.append(i)
            out.logprobs.append(logprobs_to_proto(lp, token))
    return out


def step_output_from_proto(p: worker_pb2.StepOutput) -> StepOutput:
    logprobs: list[TokenLogprobs | None] = [None] * len(p.req_ids)
    for i, lp in zip(p.logprob_index, p.logprobs, strict=True):
        logprobs[i] = logprobs_from_proto(lp)
    return StepOutput(p.step_id, list(p.req_ids), list(p.token_ids), logprobs, p.compute_seconds)


def capacity_to_proto(c: WorkerCapacity) -> worker_pb2.WorkerCapacity:
    return worker_pb2.WorkerCapacity(
        num_blocks=c.num_blocks,
        block_size=c.block_size,
        max_model_len=c.max_model_len,
        dtype=c.dtype,
        device=c.device,
        vocab_size=c.vocab_size,
        eos_token_ids=c.eos_token_ids,
    )


def capacity_from_proto(p: worker_pb2.WorkerCapacity) -> WorkerCapacity:
    return WorkerCapacity(
        p.num_blocks, p.block_size, p.max_model_len, p.dtype, p.device, p.vocab_size, list(p.eos_token_ids)
    )
