"""Stop strings over streamed text: emit what is safe, hold back what might start a stop string.

Text arrives a token at a time, so a stop string can be split across tokens ("lo" + " wor"
for "lo w"). We keep back the longest tail of the unsent text that is a prefix of some stop
string; it is released once the next pieces rule the match out, or dropped when it completes
one. A stop string therefore never leaks into the output, not even in part.
"""

from __future__ import annotations


class StopChecker:
    def __init__(self, stop: list[str]) -> None:
        self.stop = [s for s in stop if s]  # an empty stop string would match everywhere
        self._held = ""
        self.stopped = False

    @property
    def held(self) -> str:
        return self._held

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add newly decoded text; return ``(text safe to emit, whether a stop string hit)``.

        On a hit the returned text ends right before the stop string; later calls emit nothing.
        """
        if self.stopped:
            return "", True
        text = self._held + piece
        if not self.stop:
            self._held = ""
            return text, False
        hit = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if hit >= 0:
            self._held = ""
            self.stopped = True
            return text[:hit], True
        keep = self._partial_tail(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held text, released because the request finished for another reason."""
        text, self._held = self._held, ""
        return "" if self.stopped else text

    def _partial_tail(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
