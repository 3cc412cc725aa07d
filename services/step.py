"""The scheduler -> worker step contract.

Each engine step the scheduler sends a diff against the worker's persistent batch (vLLM's
SchedulerOutput idea): requests the worker has not seen, with their tokens and block ids;
requests it already holds, with only their new block ids; and ids to drop. The worker answers
with one sampled token per request whose scheduled tokens reached the end of what it knows.
These dataclasses map 1:1 onto the protobuf messages of the Worker service.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequest:
    req_id: str
    token_ids: list[int]  # prompt, plus tokens generated before a preemption
    block_ids: list[int]
    num_computed_tokens: int  # tokens whose KV is already in the cache (prefix-cache hit)
    sampling: SamplingParams
    num_output_tokens: int = 0  # how many of token_ids are generated (penalties count only these)
    traceparent: str = ""  # W3C trace context of the request, for the worker's step spans


@dataclass(slots=True)
class CachedRequest:
    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass(slots=True)
class StepInput:
    step_id: int
    new_requests: list[NewRequest] = field(default_factory=list)
    cached_requests: list[CachedRequest] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)  # req_id -> chunk length
    dropped_req_ids: list[str] = field(default_factory=list)  # finished, aborted or preempted

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


@dataclass(slots=True)
class TokenLogprobs:
    logprob: float  # of the sampled token
    rank: int  # 1 = most likely
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(slots=True)
class StepOutput:
    step_id: int
    req_ids: list[str]  # requests that sampled a token this step, in order
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    compute_seconds: float = 0.0


@dataclass(slots=True)
class WorkerCapacity:
    num_blocks: int
    block_size: int
    max_model_len: int
    dtype: str
    device: str
    vocab_size: int
    eos_token_ids: list[int]
