"""The pagemesh.v1.Tokenizer gRPC service: a thin adapter over Tokenizer and IncrementalDetokenizer.

It runs on the threaded server (services.grpc_server.start_server): every call is short CPU work in
the Rust tokenizer, and each DetokenizeStream holds one pool thread for its lifetime.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NoReturn

import grpc
import jinja2

from protos.pagemesh.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tokenizer_svc.detokenizer import IncrementalDetokenizer
from tokenizer_svc.tokenizer import Tokenizer

SERVICE_NAME = "pagemesh.v1.Tokenizer"


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def Tokenize(
        self, request: tokenizer_pb2.TokenizeTextRequest, context: grpc.ServicerContext
    ) -> tokenizer_pb2.TokenizeTextResponse:
        kind = request.WhichOneof("input")
        if kind == "text":
            prompt = request.text
            add_special = _optional(request, "add_special_tokens", True)
        elif kind == "chat":
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            if not messages:
                _abort(context, "chat.messages is empty")
            try:
                prompt = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=_optional(request.chat, "add_generation_prompt", True)
                )
            except (jinja2.TemplateError, ValueError, TypeError, KeyError) as e:
                # The template's raise_exception (e.g. roles out of order or unknown) or a message it
                # cannot render: the caller's input is at fault, so say what the template said.
                _abort(context, f"chat template rejected the messages: {e}")
            # The rendered template already holds BOS and the role markers; adding them again would
            # duplicate BOS on models whose post-processor prepends it (Llama 3).
            add_special = _optional(request, "add_special_tokens", False)
        else:
            _abort(context, "TokenizeTextRequest needs text or chat")
        ids = self.tokenizer.encode(prompt, add_special_tokens=add_special)
        return tokenizer_pb2.TokenizeTextResponse(token_ids=ids, prompt=prompt)

    def Detokenize(
        self, request: tokenizer_pb2.DetokenizeIdsRequest, context: grpc.ServicerContext
    ) -> tokenizer_pb2.DetokenizeIdsResponse:
        ids = list(request.token_ids)
        # The Rust decoder drops unknown ids silently; a caller asking for them has a bug worth seeing.
        bad = [i for i in ids if i >= self.tokenizer.vocab_size]
        if bad:
            _abort(context, f"token ids {bad[:8]} are outside the vocabulary ({self.tokenizer.vocab_size})")
        skip = _optional(request, "skip_special_tokens", True)
        response = tokenizer_pb2.DetokenizeIdsResponse(text=self.tokenizer.decode(ids, skip))
        if request.per_token:
            # Per-token text is for logprobs, which name every token, special ones included; one Rust
            # call decodes them all.
            response.tokens.extend(self.tokenizer.backend.decode_batch([[i] for i in ids], False))
            response.token_bytes.extend(self.tokenizer.token_bytes(i) for i in ids)
        return response

    def GetInfo(
        self, request: tokenizer_pb2.TokenizerInfoRequest, context: grpc.ServicerContext
    ) -> tokenizer_pb2.TokenizerInfo:
        return tokenizer_pb2.TokenizerInfo(
            vocab_size=self.tokenizer.vocab_size,
            eos_token_ids=self.tokenizer.eos_token_ids,
            bos_token_id=self.tokenizer.bos_token_id,
        )

    def DetokenizeStream(
        self, request_iterator: Iterator[tokenizer_pb2.DetokenizeBatch], context: grpc.ServicerContext
    ) -> Iterator[tokenizer_pb2.DetokenizeBatchResult]:
        # State lives in this call only: if the stream breaks, the scheduler reopens it and starts over.
        running: dict[str, IncrementalDetokenizer] = {}
        for batch in request_iterator:
            yield self._step(batch, running, context)

    def _step(
        self,
        batch: tokenizer_pb2.DetokenizeBatch,
        running: dict[str, IncrementalDetokenizer],
        context: grpc.ServicerContext,
    ) -> tokenizer_pb2.DetokenizeBatchResult:
        # Order inside a batch: start (a new request's first tokens come in the same step), tokens,
        # release.
        for s in batch.start:
            if s.request_id in running:
                _abort(context, f"step {batch.step_id}: request {s.request_id!r} was already started")
            running[s.request_id] = IncrementalDetokenizer(
                self.tokenizer,
                prompt_token_ids=list(s.prompt_tail_ids),
                skip_special_tokens=s.skip_special_tokens,
                stop=list(s.stop),
                include_stop_str_in_output=s.include_stop_str_in_output,
            )
        result = tokenizer_pb2.DetokenizeBatchResult(step_id=batch.step_id)
        for t in batch.tokens:
            detok = running.get(t.request_id)
            if detok is None:
                _abort(context, f"step {batch.step_id}: tokens for unknown request {t.request_id!r}")
            delta = detok.add(t.token_ids)
            text, stop = delta.text, delta.stop_reason
            if t.finished:
                tail = detok.flush()
                text, stop = text + tail.text, stop or tail.stop_reason
                del running[t.request_id]
            # stop_string stays set on any later delta of a stopped request (with empty text), so a
            # scheduler that pipelined more tokens before seeing the stop gets the same verdict.
            result.deltas.append(
                tokenizer_pb2.DetokDelta(request_id=t.request_id, text=text, stop_string=stop)
            )
        for request_id in batch.release:
            # Lenient: an abort may race with the request's own finish, and both are fine.
            running.pop(request_id, None)
        return result


def _optional(message: Any, field: str, default: bool) -> bool:
    return getattr(message, field) if message.HasField(field) else default


def _abort(context: grpc.ServicerContext, message: str) -> NoReturn:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
    raise AssertionError("unreachable: context.abort raises")
