"""Incremental detokenization with stop strings, for one streaming request.

Two problems sit between "the model produced token 1234" and "send this text to the client":

1. A token's text depends on its neighbours: byte-level BPE splits one UTF-8 character over several
   tokens, and SentencePiece-style decoders treat a word's leading space differently at the start
   of a decode. So we decode a small sliding window of ids (prefix_offset..end) and emit only what
   the new ids added after the already-emitted part (prefix_offset..read_offset), and only once the
   text does not end in an incomplete character (U+FFFD). Work per call is the window, never the
   whole output.
2. Stop strings live in text, not tokens, and one may straddle tokens. Text that could still turn
   into a stop string is held back until the next tokens settle it, so a client never sees part of
   a stop string that then matches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tokenizer_svc.tokenizer import Tokenizer

# Prompt tokens decoded ahead of the first output token: one is enough to fix the first word's leading
# space; a few more are cheap insurance against decoders that look further back.
PROMPT_CONTEXT_TOKENS = 4
# An incomplete UTF-8 character spans at most 3 more bytes, so a window that stays incomplete for
# this many tokens is a model emitting invalid bytes: emit the replacement char rather than let the
# window (and the per-token work) grow without bound.
MAX_PENDING_TOKENS = 16
REPLACEMENT_CHAR = "\ufffd"


@dataclass(slots=True)
class DetokenizerDelta:
    text: str = ""  # new text that is safe to send to the client
    stop_reason: str | None = None  # the stop string that matched, if one did
    finished_by_stop: bool = False


class StopStringMatcher:
    """Finds the first stop string in a text stream, holding back any tail that may begin one."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self.stop = [s for s in dict.fromkeys(stop) if s]
        self.include_stop = include_stop_str_in_output
        # Only a tail shorter than the longest stop string can be an unfinished match.
        self.max_hold = max((len(s) for s in self.stop), default=1) - 1
        self.held = ""

    def feed(self, text: str) -> DetokenizerDelta:
        if not self.stop:
            return DetokenizerDelta(text)
        buf = self.held + text
        match = self._first_match(buf)
        if match is not None:
            start, stop = match
            self.held = ""
            end = start + len(stop) if self.include_stop else start
            return DetokenizerDelta(buf[:end], stop, True)
        hold = self._unfinished_tail(buf)
        self.held = buf[len(buf) - hold :]
        return DetokenizerDelta(buf[: len(buf) - hold])

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held

    def _first_match(self, buf: str) -> tuple[int, str] | None:
        # The match that ends first is the one a character-by-character stream would hit first, so the
        # result does not depend on how tokens were batched into calls; on a tie the longer string wins.
        best: tuple[int, int, str] | None = None
        for s in self.stop:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        return None if best is None else (best[1], best[2])

    def _unfinished_tail(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        for n in range(min(self.max_hold, len(buf)), 0, -1):
            tail = buf[len(buf) - n :]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        stop: Sequence[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._backend = tokenizer.backend
        self.skip_special_tokens = skip_special_tokens
        self._matcher = StopStringMatcher(stop or (), include_stop_str_in_output)
        self.num_output_tokens = 0
        self.finished = False
        self.stop_reason: str | None = None

        # The window: self._ids[:self._read] were already emitted and are kept only as decode context
        # (their text is _prefix_text); ids after _read are not emitted yet. Seeding the context with
        # the prompt's tail lets the first output word keep its leading space as it reads after the
        # prompt (what vLLM emits; for byte-level BPE it is exactly decode(output_ids)).
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_text = self._decode(context)
        if self._prefix_text.endswith(REPLACEMENT_CHAR):
            # The prompt ends inside a character; output bytes would complete it and slicing by the
            # prompt's text length would cut the wrong place. Decode the output on its own instead.
            context, self._prefix_text = [], ""
        self._ids = context
        self._read = len(context)

    def add(self, new_token_ids: Iterable[int]) -> DetokenizerDelta:
        """Take the tokens of one engine step; return the text they make safe to emit."""
        if self.finished:  # tokens scheduled before the stop was seen: drop them, repeat the verdict
            return DetokenizerDelta("", self.stop_reason, True)
        pieces = []
        for token_id in new_token_ids:
            self.num_output_tokens += 1
            self._ids.append(token_id)
            pieces.append(self._advance(force=False))
        delta = self._matcher.feed("".join(pieces))
        if delta.finished_by_stop:
            self.finished = True
            self.stop_reason = delta.stop_reason
        return delta

    def flush(self) -> DetokenizerDelta:
        """End of a request that stopped for another reason (EOS, length, abort): emit what is held."""
        if self.finished:
            return DetokenizerDelta("", self.stop_reason, True)
        delta = self._matcher.feed(self._advance(force=True))
        if delta.finished_by_stop:
            self.finished, self.stop_reason = True, delta.stop_reason
            return delta
        delta.text += self._matcher.flush()
        return delta

    def _advance(self, force: bool) -> str:
        text = self._decode(self._ids)
        stable = len(text) > len(self._prefix_text) and not text.endswith(REPLACEMENT_CHAR)
        if not (stable or force or len(self._ids) - self._read >= MAX_PENDING_TOKENS):
            return ""  # mid-character, or only skipped special tokens so far: wait for more ids
        # A window whose text ends on a whole character decodes to a prefix of any longer window's
        # text, so what the new ids added is everything past _prefix_text.
        new_text = text[len(self._prefix_text) :]
        # Slide: the ids just emitted become the next window's context, older ones are dropped.
        del self._ids[: self._read]
        self._prefix_text = self._decode(self._ids)
        self._read = len(self._ids)
        return new_text

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""
