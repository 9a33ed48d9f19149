"""Token ids to text as they are generated: incremental detokenization and stop strings."""

from __future__ import annotations


class Detokenizer:
    """New text for each new token, decoding a short window so a token that completes a multi-byte
    character (or changes how the previous one is spelled) comes out right. The approach of TGI and
    vLLM: decode ids[prefix:] and ids[prefix:read], emit the difference once it no longer ends in an
    unfinished character."""

    def __init__(self, tokenizer, prompt: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt[-4:])  # a little context: some tokenizers spell a token by its neighbour
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before, after = self._window()
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """The text held back at the end: a reply cut short mid-character ends as a whole decode
        of its tokens would (with U+FFFD), so the streamed text always equals the full decode."""
        before, after = self._window()
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]

    def _window(self) -> tuple[str, str]:
        """The window's text without, and with, the tokens not emitted yet."""
        decode = self.tokenizer.decode
        return (
            decode(self.ids[self.prefix : self.read], skip_special_tokens=True),
            decode(self.ids[self.prefix :], skip_special_tokens=True),
        )


class StopStrings:
    """Text up to (not including) the first stop string. The tail that could still be the start of
    one is held back until the next piece shows it is not."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.keep = max(map(len, self.stops), default=1) - 1
        self.held = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        if not self.stops:
            return piece
        self.held += piece
        cut = min((i for i in (self.held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self.held = self.held[:cut], ""
            return out
        if len(self.held) > self.keep:
            out = self.held[: len(self.held) - self.keep]
            self.held = self.held[len(self.held) - self.keep :]
            return out
        return ""

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
