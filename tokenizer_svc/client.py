"""asyncio client of pagemesh.v1.Tokenizer, as the scheduler uses it.

The server's INVALID_ARGUMENT (bad chat input, ids outside the vocabulary, a stream protocol slip)
becomes ValueError with the server's message; other gRPC failures stay grpc.aio.AioRpcError.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from protos.pagemesh.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from services.grpc_server import aio_channel

T = TypeVar("T")
ChatMessages = Sequence[tuple[str, str]] | Sequence[Mapping[str, Any]]


class TokenizerClient:
    def __init__(self, target: str | grpc.aio.Channel) -> None:
        """target: an address (host:port or unix:///path.sock) or a channel the caller owns."""
        self._owns_channel = isinstance(target, str)
        self.channel = aio_channel(target) if isinstance(target, str) else target
        self.stub = tokenizer_pb2_grpc.TokenizerStub(self.channel)

    async def tokenize_text(self, text: str, add_special_tokens: bool | None = None) -> tuple[list[int], str]:
        request = tokenizer_pb2.TokenizeTextRequest(text=text, add_special_tokens=add_special_tokens)
        response = await _call(self.stub.Tokenize, request)
        return list(response.token_ids), response.prompt

    async def tokenize_chat(
        self, messages: ChatMessages, add_generation_prompt: bool = True
    ) -> tuple[list[int], str]:
        """messages: (role, content) pairs or {"role", "content"} dicts. Returns ids and rendered prompt."""
        chat = common_pb2.ChatInput(add_generation_prompt=add_generation_prompt)
        for m in messages:
            role, content = (m["role"], m.get("content")) if isinstance(m, Mapping) else m
            chat.messages.add(role=role, content=content or "")
        response = await _call(self.stub.Tokenize, tokenizer_pb2.TokenizeTextRequest(chat=chat))
        return list(response.token_ids), response.prompt

    async def detokenize(
        self, ids: Sequence[int], skip_special_tokens: bool = True, per_token: bool = False
    ) -> tokenizer_pb2.DetokenizeIdsResponse:
        request = tokenizer_pb2.DetokenizeIdsRequest(
            token_ids=ids, skip_special_tokens=skip_special_tokens, per_token=per_token
        )
        return await _call(self.stub.Detokenize, request)

    async def info(self) -> tokenizer_pb2.TokenizerInfo:
        return await _call(self.stub.GetInfo, tokenizer_pb2.TokenizerInfoRequest())

    def detokenize_session(self) -> DetokenizeSession:
        return DetokenizeSession(self.stub)

    async def close(self) -> None:
        if self._owns_channel:
            await self.channel.close()

    async def __aenter__(self) -> TokenizerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class DetokenizeSession:
    """One DetokenizeStream. send() one batch per engine step and await that step's result.

    Several sends may be in flight at once (the scheduler runs step N+1 while step N is detokenized):
    results are matched to their batch by step_id, so step ids in flight must be distinct.
    """

    def __init__(self, stub: tokenizer_pb2_grpc.TokenizerStub) -> None:
        self._call = stub.DetokenizeStream()
        self._pending: dict[int, asyncio.Future[tokenizer_pb2.DetokenizeBatchResult]] = {}
        self._write_lock = asyncio.Lock()  # grpc.aio allows one write at a time per call
        self._reader: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    async def send(self, batch: tokenizer_pb2.DetokenizeBatch) -> tokenizer_pb2.DetokenizeBatchResult:
        if self._error is not None:
            raise self._error
        if batch.step_id in self._pending:
            raise ValueError(f"step {batch.step_id} is already in flight on this stream")
        future: asyncio.Future[tokenizer_pb2.DetokenizeBatchResult] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[batch.step_id] = future
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_results())
        try:
            async with self._write_lock:
                await self._call.write(batch)
        except Exception:
            # A broken stream: the reader fails the future with the server's status; otherwise re-raise.
            if not future.done():
                del self._pending[batch.step_id]
                raise
        return await future

    async def close(self) -> None:
        """Half-close and wait for the server to answer what is in flight."""
        if self._error is None:
            async with self._write_lock:
                await self._call.done_writing()
        if self._reader is not None:
            await self._reader

    def cancel(self) -> None:
        self._call.cancel()

    async def _read_results(self) -> None:
        try:
            while (result := await self._call.read()) is not grpc.aio.EOF:
                future = self._pending.pop(result.step_id, None)
                if future is not None and not future.done():  # None or done: the sender gave up
                    future.set_result(result)
            error: BaseException = ConnectionError("DetokenizeStream is closed")
        except grpc.aio.AioRpcError as e:
            error = ValueError(e.details()) if e.code() == grpc.StatusCode.INVALID_ARGUMENT else e
        except asyncio.CancelledError:
            error = ConnectionError("DetokenizeStream was cancelled")
        self._error = error
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()


async def _call(method: Callable[[Any], Awaitable[T]], request: Any) -> T:
    try:
        return await method(request)
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise ValueError(e.details()) from e
        raise
