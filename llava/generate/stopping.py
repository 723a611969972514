"""Incremental detokenisation with stop strings: text is released as it becomes final, and nothing
that could still turn out to be the start of a stop string is shown early."""

from __future__ import annotations


class TextStream:
    """Decodes one sequence's new tokens; `push` returns the text that is safe to show now."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""  # the answer so far (stop string excluded)
        self.shown = 0  # characters of it already released
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for the next token
            return ""
        if self.stop:
            # stop strings may be special tokens (hidden from `text`), so look in the raw decoding
            raw = self.tokenizer.decode(self.ids, skip_special_tokens=False)
            if any(stop in raw for stop in self.stop):
                self.stopped = True
                cuts = [text.find(stop) for stop in self.stop if stop in text]
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
