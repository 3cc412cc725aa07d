"""The tokenizer service over a real gRPC server on a Unix socket, driven by the real asyncio client."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from protos.pagemesh.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from services.grpc_server import Service, insecure_channel, start_server
from tokenizer_svc.client import DetokenizeSession, TokenizerClient
from tokenizer_svc.service import SERVICE_NAME, TokenizerServicer
from tokenizer_svc.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def serve(model_dir: Path, socket: Path) -> tuple[grpc.Server, str]:
    address = f"unix://{socket}"
    servicer = TokenizerServicer(Tokenizer.from_dir(model_dir))
    server = start_server(
        [address], [Service(tokenizer_pb2_grpc.add_TokenizerServicer_to_server, servicer, SERVICE_NAME)]
    )
    return server, address


@pytest.fixture(scope="module")
def tok(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def address(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server, addr = serve(default_model_dir, tmp_path_factory.mktemp("tok") / "tok.sock")
    yield addr
    server.stop(grace=None)


def with_client(address: str, body: Callable[[TokenizerClient], Awaitable[T]]) -> T:
    async def run() -> T:
        async with TokenizerClient(address) as client:
            return await body(client)

    return asyncio.run(run())


def batch(
    step: int, start: Sequence[Any] = (), tokens: Sequence[Any] = (), release: Sequence[str] = ()
) -> Any:
    return tokenizer_pb2.DetokenizeBatch(step_id=step, start=start, tokens=tokens, release=release)


def start(request_id: str, prompt_tail: Sequence[int] = (), stop: Sequence[str] = (), **kw: Any) -> Any:
    return tokenizer_pb2.DetokStart(
        request_id=request_id, prompt_tail_ids=prompt_tail, stop=stop, skip_special_tokens=True, **kw
    )


def tokens(request_id: str, ids: list[int], finished: bool = False) -> Any:
    return tokenizer_pb2.DetokTokens(request_id=request_id, token_ids=ids, finished=finished)


def test_service_does_not_import_torch() -> None:
    code = (
        "import sys, tokenizer_svc.service, tokenizer_svc.client, tokenizer_svc.main\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ---- unary RPCs ------------------------------------------------------------------------------------------


def test_tokenize_matches_in_process_tokenizer(address: str, tok: Tokenizer) -> None:
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Tell me a joke about 🐍 and ünïcode."},
    ]

    async def body(client: TokenizerClient) -> None:
        for text in ["Hello world", "Héllo 🙂 <|im_start|>x", ""]:
            assert await client.tokenize_text(text) == (tok.encode(text), text)
            assert await client.tokenize_text(text, add_special_tokens=False) == (
                tok.encode(text, False),
                text,
            )

        prompt = tok.apply_chat_template(conversation)
        expected = (tok.encode(prompt, add_special_tokens=False), prompt)
        assert await client.tokenize_chat(conversation) == expected
        assert await client.tokenize_chat([(m["role"], m["content"]) for m in conversation]) == expected
        assert prompt.endswith("<|im_start|>assistant\n")

        no_gen = tok.apply_chat_template(conversation, add_generation_prompt=False)
        assert await client.tokenize_chat(conversation, add_generation_prompt=False) == (
            tok.encode(no_gen, add_special_tokens=False),
            no_gen,
        )

    with_client(address, body)


def test_detokenize_and_info(address: str, tok: Tokenizer) -> None:
    text = "Héllo wörld 🙂 日本語"
    ids = tok.encode(text)

    async def body(client: TokenizerClient) -> None:
        plain = await client.detokenize(ids)
        assert plain.text == text and not plain.tokens and not plain.token_bytes

        per = await client.detokenize([*ids, 2], skip_special_tokens=False, per_token=True)
        assert per.text == text + "<|im_end|>"
        assert list(per.tokens) == [tok.decode([i], skip_special_tokens=False) for i in [*ids, 2]]
        assert b"".join(per.token_bytes) == (text + "<|im_end|>").encode()
        assert (await client.detokenize([*ids, 2])).text == text  # specials skipped by default

        with pytest.raises(ValueError, match="outside the vocabulary"):
            await client.detokenize([1, 10**6])

        info = await client.info()
        assert info.vocab_size == tok.vocab_size == 49152
        assert list(info.eos_token_ids) == tok.eos_token_ids
        assert info.HasField("bos_token_id") and info.bos_token_id == tok.bos_token_id

    with_client(address, body)


def test_bad_chat_input_is_invalid_argument(address: str, default_model_dir: Path, tmp_path: Path) -> None:
    async def body(client: TokenizerClient) -> None:
        with pytest.raises(ValueError, match="messages is empty"):
            await client.tokenize_chat([])

    with_client(address, body)

    # The raw status code, as other gRPC clients see it.
    with insecure_channel(address) as channel:
        stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        for request in [
            tokenizer_pb2.TokenizeTextRequest(chat=common_pb2.ChatInput()),
            tokenizer_pb2.TokenizeTextRequest(),
        ]:
            with pytest.raises(grpc.RpcError) as e:
                stub.Tokenize(request)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # A template that rejects roles it does not know, as many models' templates do.
    model = tmp_path / "strict"
    model.mkdir()
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(default_model_dir / name, model / name)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    )
    server, strict = serve(model, tmp_path / "strict.sock")
    try:

        async def strict_body(client: TokenizerClient) -> None:
            assert (await client.tokenize_chat([("user", "hi")]))[1] == "user: hi\n"
            with pytest.raises(ValueError, match="unknown role wizard"):
                await client.tokenize_chat([("wizard", "hi")])

        with_client(strict, strict_body)
    finally:
        server.stop(grace=None)


# ---- DetokenizeStream ------------------------------------------------------------------------------------


def test_stream_interleaved_requests(address: str, tok: Tokenizer) -> None:
    prompt = tok.encode("Say something:")
    outputs = {
        "a": tok.encode(" The café serves crème brûlée 🍮 daily.", False),
        "b": tok.encode(" 日本語のテキスト and 🇫🇷 flags", False),
        "c": tok.encode(" never finishes", False),
    }
    # Each request joins at its own step and gets a different number of tokens per step.
    first_step = {"a": 0, "b": 1, "c": 2}
    chunk = {"a": 1, "b": 2, "c": 3}

    async def body(client: TokenizerClient) -> dict[str, str]:
        session = client.detokenize_session()
        texts = dict.fromkeys(outputs, "")
        sent = dict.fromkeys(outputs, 0)
        step = 0
        while any(sent[r] < len(outputs[r]) for r in ("a", "b")):
            starts = [start(r, prompt[-4:]) for r in outputs if first_step[r] == step]
            entries = []
            for r, ids in outputs.items():
                if step < first_step[r] or sent[r] >= len(ids) or (r == "c" and step > 3):
                    continue
                piece = ids[sent[r] : sent[r] + chunk[r]]
                sent[r] += len(piece)
                entries.append(tokens(r, piece, finished=r != "c" and sent[r] == len(ids)))
            release = ["c"] if step == 3 else []
            result = await session.send(batch(step, starts, entries, release))
            assert result.step_id == step
            assert [d.request_id for d in result.deltas] == [e.request_id for e in entries]
            for d in result.deltas:
                assert not d.HasField("stop_string")
                texts[d.request_id] += d.text
            step += 1

        # Finished and released requests are forgotten: their ids can start again, new tokens are refused.
        result = await session.send(batch(step, [start("a"), start("c")], [tokens("a", tok.encode("ok"))]))
        assert [(d.request_id, d.text) for d in result.deltas] == [("a", "ok")]
        with pytest.raises(ValueError, match="unknown request 'b'"):
            await session.send(batch(step + 1, tokens=[tokens("b", [1])]))
        await session.close()
        return texts

    texts = with_client(address, body)
    assert texts["a"] == tok.decode(outputs["a"])
    assert texts["b"] == tok.decode(outputs["b"])
    assert tok.decode(outputs["c"]).startswith(texts["c"]) and texts["c"]


def feed_one_by_one(session: DetokenizeSession, request_id: str, ids: list[int], first_step: int) -> Any:
    async def run() -> list[Any]:
        deltas = []
        for n, token_id in enumerate(ids):
            result = await session.send(batch(first_step + n, tokens=[tokens(request_id, [token_id])]))
            deltas.append(result.deltas[0])
        return deltas

    return run()


def test_stream_stop_strings_split_across_tokens(address: str, tok: Tokenizer) -> None:
    text = " The capital of France is Paris. It is big."
    ids = tok.encode(text, False)
    stop = "al of Fr"
    assert not any(stop in tok.decode([i]) for i in ids), "the stop string must straddle tokens"

    async def body(client: TokenizerClient) -> None:
        session = client.detokenize_session()
        await session.send(batch(0, [start("x", stop=[stop, "never"])]))
        deltas = await feed_one_by_one(session, "x", ids, 1)
        stopped = [n for n, d in enumerate(deltas) if d.HasField("stop_string")]
        assert stopped, "stop string not found"
        first = stopped[0]
        assert deltas[first].stop_string == stop
        assert "".join(d.text for d in deltas) == " The capit"
        # After the stop: empty text, same verdict, for every token the scheduler had pipelined.
        assert all(d.text == "" and d.stop_string == stop for d in deltas[first + 1 :])

        # include_stop_str_in_output keeps the stop string and cuts right after it.
        await session.send(batch(100, [start("y", stop=[stop], include_stop_str_in_output=True)]))
        deltas = await feed_one_by_one(session, "y", ids, 101)
        assert "".join(d.text for d in deltas) == " The capital of Fr"
        await session.close()

    with_client(address, body)


def test_stream_finished_flushes_held_text(address: str, tok: Tokenizer) -> None:
    ids = tok.encode(" Paris.", False)

    async def body(client: TokenizerClient) -> None:
        session = client.detokenize_session()
        # "." may begin the stop string ". Next", so it is held back until the request ends.
        first = await session.send(batch(0, [start("p", stop=[". Next"])], [tokens("p", ids)]))
        assert first.deltas[0].text == " Paris"
        last = await session.send(batch(1, tokens=[tokens("p", [], finished=True)]))
        assert last.deltas[0].text == "." and not last.deltas[0].HasField("stop_string")

        # Finishing in the same entry as the last tokens; released requests give no delta at all.
        result = await session.send(
            batch(2, [start("q", stop=[". Next"]), start("r")], [tokens("q", ids, finished=True)], ["r"])
        )
        assert [(d.request_id, d.text) for d in result.deltas] == [("q", " Paris.")]

        with pytest.raises(ValueError, match="already started"):
            await session.send(batch(3, [start("s"), start("s")]))

    with_client(address, body)


def test_stream_pipelined_batches(address: str, tok: Tokenizer) -> None:
    ids = tok.encode(" one two three four five six", False)

    async def body(client: TokenizerClient) -> str:
        session = client.detokenize_session()
        sends = [session.send(batch(0, [start("z")]))]
        sends += [session.send(batch(n + 1, tokens=[tokens("z", [i])])) for n, i in enumerate(ids)]
        results = await asyncio.gather(*sends)  # all in flight at once
        assert [r.step_id for r in results] == list(range(len(ids) + 1))
        await session.close()
        return "".join(d.text for r in results for d in r.deltas)

    assert with_client(address, body) == tok.decode(ids)


# ---- health, reflection, the real process -----------------------------------------------------------------


def test_health_and_reflection(address: str) -> None:
    with insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", SERVICE_NAME]:
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING

        db = ProtoReflectionDescriptorDatabase(channel)
        assert SERVICE_NAME in db.get_services()
        descriptor = db.FindFileContainingSymbol(SERVICE_NAME)
        methods = {m.name for s in descriptor.service if s.name == "Tokenizer" for m in s.method}
        assert methods == {"Tokenize", "Detokenize", "GetInfo", "DetokenizeStream"}


def test_main_runs_as_a_process_and_stops_on_sigterm(default_model_dir: Path, tmp_path: Path) -> None:
    address = f"unix://{tmp_path}/main.sock"
    command = [sys.executable, "-m", "tokenizer_svc.main", "--model", str(default_model_dir)]
    with subprocess.Popen(
        [*command, "--address", address],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        try:
            with insecure_channel(address) as channel:
                # Ready and SERVING, or a timeout here rather than a test that hangs.
                grpc.channel_ready_future(channel).result(timeout=20)
                health = health_pb2_grpc.HealthStub(channel)
                response = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
                assert response.status == health_pb2.HealthCheckResponse.SERVING
                stub = tokenizer_pb2_grpc.TokenizerStub(channel)
                reply = stub.Tokenize(tokenizer_pb2.TokenizeTextRequest(text="Hello world"), timeout=5)
                assert reply.prompt == "Hello world" and len(reply.token_ids) == 2

            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            output, _ = proc.communicate(timeout=5)
            assert proc.returncode == 0, output
            assert time.monotonic() - began < 5
            assert output.splitlines()[0] == f"tokenizer: serving on {address}"
        finally:
            if proc.poll() is None:
                proc.kill()
