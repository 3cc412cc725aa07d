"""Text <-> token ids and chat templates for a Hugging Face model directory, without torch.

Built on the `tokenizers` library (the same Rust code transformers' fast tokenizers run) plus jinja2
for chat templates, so the tokenizer service and the in-process engine start in well under a second
and never pull torch in. Behaviour follows transformers 5 for the same directory; the tests check
that parity against `AutoTokenizer`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RustTokenizer

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    def __init__(
        self,
        backend: RustTokenizer,
        *,
        chat_template: str | None = None,
        tool_chat_template: str | None = None,
        special_tokens: dict[str, Any] | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        # Some models ship a separate template for requests that carry tools.
        self.tool_chat_template = tool_chat_template
        # bos_token, eos_token, ... as strings; chat templates read them as variables.
        self.special_tokens = dict(special_tokens or {})
        self.eos_token_ids = list(eos_token_ids)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        bos = self.special_tokens.get("bos_token")
        self.bos_token_id: int | None = backend.token_to_id(bos) if isinstance(bos, str) else None
        self._templates: dict[str, jinja2.Template] = {}
        self._byte_decoder = _byte_level_decoder() if _uses_byte_level(backend) else None
        self._added_tokens = {t.content for t in backend.get_added_tokens_decoder().values()}

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        backend = RustTokenizer.from_file(str(path / "tokenizer.json"))
        # A served tokenizer never pads or truncates on its own; the engine enforces lengths.
        backend.no_padding()
        backend.no_truncation()
        config = _read_json(path / "tokenizer_config.json")

        special: dict[str, Any] = {}
        for source in (_read_json(path / "special_tokens_map.json"), config):  # tokenizer_config wins
            for name in SPECIAL_TOKEN_NAMES:
                if source.get(name) is not None:
                    special[name] = _token_content(source[name])
            extra = source.get("additional_special_tokens") or source.get("extra_special_tokens")
            if isinstance(extra, list) and extra:
                special["additional_special_tokens"] = [_token_content(t) for t in extra]

        default_template, tool_template = _load_chat_templates(path, config)

        eos_ids: list[int] = []
        for source in (_read_json(path / "generation_config.json"), _read_json(path / "config.json")):
            value = source.get("eos_token_id")
            eos_ids += value if isinstance(value, list) else [value] if isinstance(value, int) else []
        eos_token = special.get("eos_token")
        if isinstance(eos_token, str) and (eos_id := backend.token_to_id(eos_token)) is not None:
            eos_ids.append(eos_id)
        return cls(
            backend,
            chat_template=default_template,
            tool_chat_template=tool_template,
            special_tokens=special,
            eos_token_ids=list(dict.fromkeys(eos_ids)),
        )

    # ---- ids <-> text ------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # Whether BOS/EOS are added is up to tokenizer.json's post-processor alone: transformers 5 ignores
        # add_bos_token/add_eos_token in tokenizer_config.json whenever a tokenizer.json exists. SmolLM2's
        # adds nothing; Llama 3's prepends <|begin_of_text|>.
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        # One Rust call for the whole batch: the service tokenizes every request of a step at once.
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        # transformers 5 skips clean_up_tokenization_spaces for BPE models, so this is its decode too.
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, as OpenAI's chat logprobs report them.

        A single token can be part of a UTF-8 character, so its text alone is not enough.
        """
        token = self.backend.id_to_token(token_id)
        if token is None:
            return b""
        if token in self._added_tokens:
            return token.encode()
        if self._byte_decoder is not None:  # GPT-2 style: every char of the token is one byte
            return bytes(self._byte_decoder.get(c, 0) for c in token)
        if m := _BYTE_FALLBACK_TOKEN.fullmatch(token):  # SentencePiece byte fallback, e.g. <0xE2>
            return bytes([int(m.group(1), 16)])
        return token.replace("\u2581", " ").encode()

    # ---- chat ----------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to the prompt text, as transformers' apply_chat_template(tokenize=False).

        The result already holds the template's special tokens: encode it with add_special_tokens=False.
        """
        source = self.tool_chat_template if tools and self.tool_chat_template else self.chat_template
        if source is None:
            raise ValueError("this model has no chat template; use the completions API with a plain prompt")
        template = self._templates.get(source)
        if template is None:
            template = self._templates[source] = _compile_template(source)
        variables = {**self.special_tokens, **kwargs}
        return template.render(
            messages=[_plain_message(m) for m in messages],
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )


# ---- loading helpers -----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _token_content(token: Any) -> Any:
    # tokenizer_config.json writes special tokens either as plain strings or as AddedToken dicts.
    return token.get("content") if isinstance(token, dict) else token


def _load_chat_templates(path: Path, config: dict[str, Any]) -> tuple[str | None, str | None]:
    """(default template, tool-use template) in transformers' order: .jinja files, then tokenizer_config."""
    default: str | None = None
    tool: str | None = None
    if (path / "chat_template.jinja").is_file():
        default = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "additional_chat_templates" / "tool_use.jinja").is_file():
        tool = (path / "additional_chat_templates" / "tool_use.jinja").read_text(encoding="utf-8")
    if default is None:
        default = _read_json(path / "chat_template.json").get("chat_template")
    configured = config.get("chat_template")
    if isinstance(configured, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in configured if isinstance(t, dict)}
        default = default or named.get("default")
        tool = tool or named.get("tool_use")
    elif isinstance(configured, str):
        default = default or configured
    return default, tool


# ---- chat template rendering ---------------------------------------------------------------------------


def _plain_message(message: dict[str, Any]) -> dict[str, Any]:
    # Like transformers, drop None values (OpenAI sends content=None next to tool_calls) since templates
    # test for a key's presence. Text content parts become one string: templates for text models
    # concatenate message['content'] as a string.
    out = {k: v for k, v in message.items() if v is not None}
    content = out.get("content")
    if isinstance(content, list):
        out["content"] = _flatten_content(content)
    return out


def _flatten_content(parts: list[Any]) -> str:
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") in ("text", "input_text"):
            texts.append(str(part.get("text", "")))
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"unsupported content part {kind!r}: this server serves text-only models")
    # vLLM joins text parts with newlines; do the same so prompts match across servers.
    return "\n".join(texts)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant spans for training masks; render the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return list(parser.parse_statements(("name:endgeneration",), drop_needle=True))


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson HTML-escapes <, > and &, which would corrupt tool schemas in prompts.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _compile_template(source: str) -> jinja2.Template:
    # Templates come from model directories, i.e. from the Hub: render them in the sandbox, with the
    # environment settings and helpers transformers gives them so they produce the same text.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


# ---- byte-level BPE ------------------------------------------------------------------------------------


def _uses_byte_level(backend: RustTokenizer) -> bool:
    if backend.decoder is None:
        return False
    decoder = json.loads(backend.decoder.__getstate__())
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
    return "ByteLevel" in kinds


def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable char table that byte-level BPE vocabularies are written in.

    Printable Latin-1 bytes stand for themselves; the other bytes are shifted to code points 256+ in
    byte order so no vocabulary entry contains whitespace or control characters.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    shifted = sorted(set(range(256)) - set(printable))
    for n, b in enumerate(shifted):
        table[chr(256 + n)] = b
    return table
