"""A request as the scheduler sees it: tokens, KV block ids, progress, and how it ended."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from services.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (Status.FINISHED_STOPPED, Status.FINISHED_LENGTH, Status.FINISHED_ABORTED)


@dataclass(slots=True)
class Request:
    req_id: str
    token_ids: list[int]  # prompt then generated tokens
    num_prompt_tokens: int
    sampling: SamplingParams
    eos_token_ids: list[int]
    arrival_time: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of its full cached blocks
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    # Set by schedule(), settled by update(): more than one step's worth only when the engine
    # schedules a step while the previous one still runs (a remote worker: EngineCore.step).
    num_in_flight: int = 0  # tokens scheduled in steps whose output has not come back
    num_pending: int = 0  # tokens those steps will sample, not known here yet
    num_sent_blocks: int = 0  # block ids the worker already knows
    num_cached_tokens: int = -1  # prefix-cache hit at first admission; -1 until admitted
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    traceparent: str = ""  # W3C trace context of the caller's span ("" when not traced)
    device_seconds: float = 0.0  # its share of each step's compute time (cost attribution)

    @classmethod
    def new(
        cls, req_id: str, prompt_token_ids: list[int], sampling: SamplingParams, eos_token_ids: list[int]
    ) -> Request:
        return cls(req_id, list(prompt_token_ids), len(prompt_token_ids), sampling, eos_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def check_stop(self, token: int, max_model_len: int) -> Status | None:
        """Whether the token just appended ends the request (string stops are checked elsewhere)."""
        p = self.sampling
        if self.num_output_tokens >= p.min_tokens:
            if token in p.stop_token_ids:
                self.stop_reason = token
                return Status.FINISHED_STOPPED
            if not p.ignore_eos and token in self.eos_token_ids:
                return Status.FINISHED_STOPPED
        if p.max_tokens is not None and self.num_output_tokens >= p.max_tokens:
            return Status.FINISHED_LENGTH
        if self.num_tokens >= max_model_len:
            return Status.FINISHED_LENGTH
        return None
