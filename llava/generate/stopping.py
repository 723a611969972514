"""Incremental detokenisation with stop strings: text is released as it becomes final, and nothing
that could still turn out to be the start of a stop string is shown early.

Each token costs two decodes of a few tokens (the window since the last released text), not a
decode of the whole answer, so a long answer streams in linear time (TGI's and vLLM's scheme).
"""

from __future__ import annotations


class _Detokenizer:
    """Appends tokens and returns the new text once it is complete (no half multi-byte character)."""

    def __init__(self, tokenizer, skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] were already turned into text
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip)
        text = decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip)
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""  # nothing new yet, or an unfinished character: wait for the next token
        # decoding a window from its own start may drop a leading space that the whole answer keeps;
        # the window always starts at an already-released token, so both decodings drop it alike
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]


class TextStream:
    """Decodes one sequence's new tokens; `push` returns the text that is safe to show now."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""  # the answer so far (stop string excluded)
        self.shown = 0  # characters of it already released
        self.stopped = False
        self._visible = _Detokenizer(tokenizer, skip_special_tokens=True)
        # stop strings may be special tokens (hidden from `text`), so they are looked for in the raw text
        self._raw = _Detokenizer(tokenizer, skip_special_tokens=False) if self.stop else None
        self._raw_text = ""
        self._longest_stop = max((len(s) for s in self.stop), default=0)

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        token_id = int(token_id)
        self.ids.append(token_id)
        added = self._visible.push(token_id)
        text = self.text + added
        if self._raw is not None:
            raw_added = self._raw.push(token_id)
            if raw_added:
                start = max(0, len(self._raw_text) - self._longest_stop + 1)
                self._raw_text += raw_added
                window = self._raw_text[start:]
                if any(stop in window for stop in self.stop):
                    self.stopped = True
                    start = max(0, len(self.text) - self._longest_stop + 1)
                    cuts = [text.find(stop, start) for stop in self.stop]
                    cuts = [c for c in cuts if c >= 0]
                    text = text[:min(cuts)] if cuts else text
        safe = len(text) if self.stopped else len(text) - self._held_back(text)
        self.text = text
        delta = text[self.shown:safe]
        self.shown = max(self.shown, safe)
        return delta

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        delta = self.text[self.shown:]
        self.shown = len(self.text)
        return delta
