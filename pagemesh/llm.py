"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`, vLLM's names.

It drives the same EngineCore (Scheduler + ModelRunner) as the services, in one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from pagemesh.outputs import CompletionOutput, Logprob, RequestOutput
from services.sampling_params import SamplingParams, fan_out
from services.scheduler.engine import EngineCore
from services.scheduler.scheduler import SchedulerConfig, TokenEvent
from tokenizer_svc.detokenizer import IncrementalDetokenizer
from tokenizer_svc.tokenizer import Tokenizer
from worker.model_runner import ModelRunner

PromptType = str | dict[str, Any]


@dataclass(slots=True)
class _Sequence:
    """One of the n outputs of one prompt while it is generated."""

    output: CompletionOutput
    detokenizer: IncrementalDetokenizer | None


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        tokenizer: str | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 128,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        block_size: int = 16,
        kv_cache_memory: int | None = None,
        kv_cache_dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        device: str = "cpu",
        attention_backend: str = "auto",
        enforce_eager: bool = False,
        skip_tokenizer_init: bool = False,
        seed: int | None = None,
    ) -> None:
        if model is None:
            from pagemesh.model_store import ensure_default_model

            model = str(ensure_default_model())
        self.model = model
        self.runner = ModelRunner(
            model,
            dtype=dtype,
            device=device,
            block_size=block_size,
            max_model_len=max_model_len,
            kv_cache_memory=kv_cache_memory,
            kv_cache_dtype=kv_cache_dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            attention_backend=attention_backend,
            enforce_eager=enforce_eager,
            max_num_seqs=max_num_seqs,
        )
        config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            enable_chunked_prefill=enable_chunked_prefill,
        )
        if not enable_chunked_prefill:
            config.max_num_batched_tokens = max(max_num_batched_tokens, self.runner.max_model_len)
        self.engine = EngineCore(self.runner, config)
        self.tokenizer = None if skip_tokenizer_init else Tokenizer.from_dir(tokenizer or model)
        self.seed = seed

    # -- public API ---------------------------------------------------------------------------

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        prompt_list = [prompts] if isinstance(prompts, str | dict) else list(prompts)
        if not prompt_list:
            raise ValueError("prompts must not be empty")
        texts, token_lists = zip(*(self._tokenize(p) for p in prompt_list), strict=True)
        return self._run(list(texts), list(token_lists), sampling_params, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        if not messages:
            raise ValueError("messages must not be empty")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        tok = self._require_tokenizer()
        texts = [
            tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt) for c in conversations
        ]
        token_lists = [tok.encode(t, add_special_tokens=False) for t in texts]
        return self._run(list(texts), token_lists, sampling_params, use_tqdm)

    def get_tokenizer(self) -> Tokenizer:
        return self._require_tokenizer()

    # -- internals ----------------------------------------------------------------------------

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this LLM was created with skip_tokenizer_init=True: pass prompt_token_ids")
        return self.tokenizer

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(
                f"prompts: expected a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}"
            )
        return prompt, self._require_tokenizer().encode(prompt)

    def _run(
        self,
        texts: list[str | None],
        token_lists: list[list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        if sampling_params is None:
            params = [SamplingParams()] * len(token_lists)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(token_lists)
        else:
            params = list(sampling_params)
            if len(params) != len(token_lists):
                raise ValueError(
                    f"sampling_params: {len(params)} given for {len(token_lists)} prompts; "
                    "pass one, or one per prompt"
                )
        # Validate everything before queueing anything: a bad prompt must not leave others half-run.
        for ids, p in zip(token_lists, params, strict=True):
            self.engine.check_request(ids, p)

        results: list[RequestOutput] = []
        sequences: dict[str, tuple[RequestOutput, _Sequence]] = {}
        for text, ids, p in zip(texts, token_lists, params, strict=True):
            base = self.engine.next_request_id()
            result = RequestOutput(request_id=base, prompt=text, prompt_token_ids=ids)
            results.append(result)
            for k, (req_id, child) in enumerate(fan_out(base, p)):
                if child.seed is None and self.seed is not None:
                    child = child.clone(seed=self.seed + len(sequences))
                self.engine.add_request(req_id, ids, child)
                out = CompletionOutput(
                    index=k,
                    text="",
                    token_ids=[],
                    logprobs=[] if p.logprobs is not None else None,
                    cumulative_logprob=0.0 if p.logprobs is not None else None,
                )
                detok = None
                if self.tokenizer is not None and p.stop:
                    detok = IncrementalDetokenizer(
                        self.tokenizer, ids, p.skip_special_tokens, p.stop, p.include_stop_str_in_output
                    )
                sequences[req_id] = (result, _Sequence(out, detok))
                result.outputs.append(out)

        bar = tqdm(total=len(results), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        remaining = {id(r): len(r.outputs) for r in results}
        while self.engine.has_unfinished():
            for event in self.engine.step():
                result, seq = sequences[event.request.req_id]
                if self._on_token(event, seq):
                    result.num_cached_tokens = max(result.num_cached_tokens, event.request.num_cached_tokens)
                    remaining[id(result)] -= 1
                    if remaining[id(result)] == 0:
                        result.finished = True
                        bar.update(1)
        bar.close()
        return results

    def _on_token(self, event: TokenEvent, seq: _Sequence) -> bool:
        """Record one token; returns whether this sequence is now finished."""
        req, out = event.request, seq.output
        out.token_ids.append(event.token_id)
        if event.logprobs is not None and out.logprobs is not None:
            lp = event.logprobs
            entry = {event.token_id: Logprob(lp.logprob, lp.rank, self._piece(event.token_id))}
            for rank, (tid, val) in enumerate(zip(lp.top_ids, lp.top_logprobs, strict=True), start=1):
                entry.setdefault(tid, Logprob(val, rank, self._piece(tid)))
            out.logprobs.append(entry)
            out.cumulative_logprob = (out.cumulative_logprob or 0.0) + lp.logprob
        finished = event.finished
        if seq.detokenizer is not None:
            delta = seq.detokenizer.add([event.token_id])
            out.text += delta.text
            if delta.finished_by_stop and not finished:
                self.engine.stop(req.req_id, delta.stop_reason or "")
                finished = True
            elif finished:
                out.text += seq.detokenizer.flush().text
        if finished:
            out.finish_reason = req.finish_reason
            out.stop_reason = req.stop_reason
            if seq.detokenizer is None and self.tokenizer is not None:
                out.text = self.tokenizer.decode(
                    out.token_ids, skip_special_tokens=req.sampling.skip_special_tokens
                )
        return finished

    def _piece(self, token_id: int) -> str | None:
        return (
            None if self.tokenizer is None else self.tokenizer.decode([token_id], skip_special_tokens=False)
        )
