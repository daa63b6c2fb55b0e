"""OpenAI `stop` strings: where the streamed reply ends."""

from __future__ import annotations


class StopScanner:
    """Cuts the raw reply at the first OpenAI `stop` string, holding back a tail that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.stopped = stops, "", False
        self._longest = max((len(s) for s in stops), default=0)

    def feed(self, piece: str) -> None:
        """Add generated text; after a stop string, further text is ignored."""
        if self.stopped or not piece:
            return
        start = max(0, len(self.text) - self._longest + 1)  # earlier text was already searched
        self.text += piece
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True

    def settled(self) -> str:
        """The text no later piece can turn into the start of a stop string."""
        if self.stopped:
            return self.text
        hold = max(
            (k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])),
            default=0,
        )
        return self.text[: len(self.text) - hold]
