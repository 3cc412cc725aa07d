"""tokenizer_svc: parity with transformers, streaming detokenization and stop strings."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tokenizer_svc.detokenizer import IncrementalDetokenizer, StopStringMatcher
from tokenizer_svc.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "  leading spaces, trailing spaces   ",
    "line one\nline two\n\n\ttabbed\r\nwindows",
    "Héllo wörld, ça va? Ünïcödé ñ",
    "日本語のテキストと中文文本",
    "emoji 🙂🎉👩‍👩‍👧 and flags 🇫🇷 mixed",
    "code: def f(x):\n    return x ** 2  # square",
    "numbers 12345 and 3.14159, $1,000",
    "<|im_start|>user\nliteral special tokens<|im_end|>\n",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Tell me a joke about 🐍 and ünïcode."},
    ],
    [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": ""},
    ],
]


@pytest.fixture(scope="module")
def tok(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def hf_tok(default_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def test_import_does_not_pull_torch() -> None:
    code = (
        "import sys, tokenizer_svc.tokenizer, tokenizer_svc.detokenizer\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


# ---- parity with transformers --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tok: Tokenizer, hf_tok, add_special_tokens: bool) -> None:
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens) == hf_tok.encode(
            text, add_special_tokens=add_special_tokens
        )
    assert tok.encode_batch(TEXTS) == [hf_tok.encode(t) for t in TEXTS]


@pytest.mark.slow
@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(tok: Tokenizer, hf_tok, skip: bool) -> None:
    for text in TEXTS:
        ids = hf_tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
    ids = random.Random(0).choices(range(tok.vocab_size), k=300)  # includes byte pieces and specials
    assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.slow
def test_model_facts(tok: Tokenizer, hf_tok) -> None:
    assert tok.vocab_size == len(hf_tok) == 49152
    assert tok.eos_token_ids == [hf_tok.eos_token_id] == [2]
    assert tok.bos_token_id == hf_tok.bos_token_id
    assert tok.encode("Hi")[0] != tok.bos_token_id  # SmolLM2 adds no BOS
    for i in (0, 1, 2, 100, 9012, 49151):
        assert tok.id_to_token(i) == hf_tok.convert_ids_to_tokens(i)


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok: Tokenizer, hf_tok, messages, add_generation_prompt) -> None:
    expected = hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.slow
def test_chat_content_parts_are_flattened(tok: Tokenizer, hf_tok) -> None:
    parts: list[dict[str, Any]] = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]},
        {"role": "assistant", "content": None, "tool_calls": None},
    ]
    flat: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first\nsecond"},
        {"role": "assistant"},
    ]
    hf_flat = flat[:2]  # transformers drops None values too, but the template needs a content key
    assert tok.apply_chat_template(parts[:2]) == hf_tok.apply_chat_template(
        hf_flat, tokenize=False, add_generation_prompt=True
    )
    assert tok.apply_chat_template(flat[:2]) == tok.apply_chat_template(parts[:2])
    with pytest.raises(ValueError, match="image_url"):
        tok.apply_chat_template(
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
        )


@pytest.mark.slow
def test_token_bytes_concatenate_to_utf8(tok: Tokenizer) -> None:
    for text in TEXTS:
        if "<|" in text:
            continue
        assert b"".join(tok.token_bytes(i) for i in tok.encode(text)) == text.encode()
    assert tok.token_bytes(2) == b"<|im_end|>"


# ---- incremental detokenization ------------------------------------------------------------------------


def stream(detok: IncrementalDetokenizer, ids: list[int], chunks: list[int] | None = None) -> list[str]:
    """Feed ids in the given chunk sizes (one by one by default) and flush; return every delta's text."""
    out, i = [], 0
    for size in chunks or [1] * len(ids):
        out.append(detok.add(ids[i : i + size]).text)
        i += size
    out.append(detok.flush().text)
    return out


@pytest.fixture(scope="module")
def chat_prompt(tok: Tokenizer) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": "Say something."}])
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.slow
@pytest.mark.parametrize("skip", [True, False])
def test_stream_concatenates_to_full_decode(tok: Tokenizer, chat_prompt: list[int], skip: bool) -> None:
    rng = random.Random(1)
    for text in [*TEXTS, "".join(TEXTS)]:
        ids = tok.encode(text) + [2]  # ends in EOS like a real generation
        expected = tok.decode(ids, skip_special_tokens=skip)
        for prompt in ([], chat_prompt, tok.encode("Once upon a time")):
            assert "".join(stream(IncrementalDetokenizer(tok, prompt, skip), ids)) == expected
            chunks: list[int] = []
            while sum(chunks) < len(ids):
                chunks.append(rng.randint(1, 4))
            assert "".join(stream(IncrementalDetokenizer(tok, prompt, skip), ids, chunks)) == expected


@pytest.mark.slow
def test_stream_never_emits_partial_characters(tok: Tokenizer) -> None:
    ids = tok.encode("世界 🙂 👩‍👩‍👧")
    deltas = stream(IncrementalDetokenizer(tok, []), ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some tokens are pieces of one character and emit nothing on their own


@pytest.mark.slow
def test_stream_random_ids(tok: Tokenizer) -> None:
    # Random ids make invalid UTF-8 and stray special tokens: the stream must still match decode.
    rng = random.Random(2)
    for _ in range(20):
        ids = rng.choices(range(tok.vocab_size), k=200)
        assert "".join(stream(IncrementalDetokenizer(tok, [], False), ids)) == tok.decode(ids, False)


@pytest.mark.slow
def test_work_per_token_stays_bounded(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [])
    ids = tok.encode("All work and no play makes Jack a dull boy. 🙂 " * 200)
    for i in ids:
        detok.add([i])
        assert len(detok._ids) <= 8  # the decode window, not the whole output


# ---- stop strings --------------------------------------------------------------------------------------

ANSWER = "The answer is forty-two. Thanks!"  # tokens: The| answer| is| forty|-|two|.| Thanks|!


@pytest.mark.slow
def test_stop_string_split_across_tokens(tok: Tokenizer) -> None:
    ids = tok.encode(ANSWER)
    detok = IncrementalDetokenizer(tok, [], stop=["forty-two"])
    deltas = [detok.add([i]) for i in ids]
    hit = next(n for n, d in enumerate(deltas) if d.finished_by_stop)
    assert tok.decode(ids[: hit + 1]).endswith("forty-two")  # found on the token that completes it
    assert "".join(d.text for d in deltas) == "The answer is "
    assert deltas[hit].stop_reason == "forty-two"
    assert detok.finished and detok.stop_reason == "forty-two"
    assert detok.add([5]).text == "" and detok.flush().text == ""  # later tokens are dropped


@pytest.mark.slow
def test_held_back_text_released_when_not_a_stop(tok: Tokenizer) -> None:
    ids = tok.encode(ANSWER)
    detok = IncrementalDetokenizer(tok, [], stop=["forty-three"])
    emitted = ""
    for i in ids:
        delta = detok.add([i])
        emitted += delta.text
        assert not delta.finished_by_stop
        if tok.decode([i]) == " forty":
            assert emitted == "The answer is "  # " forty" may begin the stop: held back
        if tok.decode([i]) == "two":
            assert emitted == "The answer is forty-two"  # "forty-t" matched, "two" settled it
    assert emitted + detok.flush().text == ANSWER


@pytest.mark.slow
def test_include_stop_str_in_output(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=["forty-two"], include_stop_str_in_output=True)
    assert "".join(stream(detok, tok.encode(ANSWER))) == "The answer is forty-two"


@pytest.mark.slow
def test_multiple_stop_strings_first_in_text_wins(tok: Tokenizer) -> None:
    ids = tok.encode(ANSWER)
    for chunks in (None, [len(ids)], [2, 3, 4]):
        detok = IncrementalDetokenizer(tok, [], stop=["Thanks", "two", "is forty"])
        assert "".join(stream(detok, ids, chunks)) == "The answer "
        assert detok.stop_reason == "is forty"


@pytest.mark.slow
def test_stop_inside_one_token_and_flush_of_held_text(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=["swer"])
    assert "".join(stream(detok, tok.encode(ANSWER))) == "The an"  # " answer" is one token
    detok = IncrementalDetokenizer(tok, [], stop=["Thanks a lot"])
    deltas = stream(detok, tok.encode("The answer is forty-two. Thanks a"))  # ends mid-stop (length cap)
    assert "".join(deltas[:-1]) == "The answer is forty-two. " and deltas[-1] == "Thanks a"
    assert not detok.finished


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("xx abcab abc <stop> tail", ["abc <", "b", "<stop>", "c <st"], ("xx a", "b")),
        ("..abcdef..", ["abcdef", "cd"], ("..ab", "cd")),  # the match that ends first wins
        ("..abcdef..", ["def", "cdef"], ("..ab", "cdef")),  # same end: the longer one
        ("no stop here, only st", ["stop!"], ("no stop here, only st", None)),
    ],
)
def test_matcher_is_independent_of_chunking(text: str, stops: list[str], expected: tuple) -> None:
    for size in range(1, len(text) + 1):
        matcher = StopStringMatcher(stops)
        out, reason = "", None
        for i in range(0, len(text), size):
            delta = matcher.feed(text[i : i + size])
            out += delta.text
            if delta.finished_by_stop:
                reason = delta.stop_reason
                break
        if reason is None:
            out += matcher.flush()
        assert (out, reason) == expected


# A template exercising what real ones use (Llama 3.x / Qwen style): tools as JSON, namespace,
# loop controls, strftime_now, raise_exception, bos_token, the {% generation %} tag.
RICH_TEMPLATE = """{{ bos_token }}{% set ns = namespace(sys='') %}
{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.sys = m['content'] %}{% endif %}{% endfor %}
{% if tools %}Tools: {{ tools | tojson }}
{% endif %}Today: {{ strftime_now('%Y') | length }} {{ ns.sys }}
{% for m in messages %}
{% if m['role'] == 'system' %}{% continue %}{% endif %}
{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}
<{{ m['role'] }}>{% if m['role'] == 'assistant' %}\
{% generation %}{{ m['content'] | trim }}{% endgeneration %}\
{% else %}{{ m['content'] }}{% endif %}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}"""


@pytest.fixture(scope="module")
def bos_model_dir(default_model_dir: Path, tmp_path_factory) -> Path:
    """SmolLM2's tokenizer made to prepend BOS (as Llama 3's does) with a richer template."""
    import json
    import shutil

    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.processors import TemplateProcessing

    path = tmp_path_factory.mktemp("bos_model")
    for name in ("config.json", "generation_config.json"):
        shutil.copy(default_model_dir / name, path / name)
    backend = RustTokenizer.from_file(str(default_model_dir / "tokenizer.json"))
    backend.post_processor = TemplateProcessing(
        single="<|im_start|> $A",
        pair="<|im_start|> $A <|im_start|> $B:1",
        special_tokens=[("<|im_start|>", 1)],
    )
    backend.save(str(path / "tokenizer.json"))
    config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    # transformers 5 ignores this flag when tokenizer.json exists; so must we.
    config.update(add_eos_token=True, chat_template=RICH_TEMPLATE)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.slow
def test_bos_and_rich_template_match_transformers(bos_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(bos_model_dir)
    tok = Tokenizer.from_dir(bos_model_dir)
    assert tok.encode("x")[-1] != 2
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text)
        assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert tok.encode("x")[0] == tok.bos_token_id == 1
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "<temp> & more"}}]
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "  Sunny.  "},
        {"role": "user", "content": "Thanks"},
    ]
    variants: list[dict[str, Any]] = [{}, {"tools": tools}, {"add_generation_prompt": False}]
    for kwargs in variants:
        expected = hf.apply_chat_template(
            messages, tokenize=False, **{"add_generation_prompt": True, **kwargs}
        )
        assert tok.apply_chat_template(messages, **kwargs) == expected
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="bad role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
