"""Finding marker strings in streamed text, where a chunk may end inside a marker."""

from __future__ import annotations

from collections.abc import Iterable


def find_first(text: str, markers: Iterable[str], start: int = 0) -> tuple[int, str] | None:
    """(position, marker) of the earliest full marker in ``text[start:]`` (the longest one
    when two start at the same place), or None."""
    best: tuple[int, str] | None = None
    for marker in markers:
        pos = text.find(marker, start)
        if pos >= 0 and (best is None or pos < best[0]
                         or (pos == best[0] and len(marker) > len(best[1]))):
            best = (pos, marker)
    return best


def partial_start(text: str, markers: Iterable[str], start: int = 0) -> int:
    """Where the longest suffix of ``text[start:]`` that is a proper prefix of a marker
    begins (``len(text)`` if none): text from there on may still become a marker."""
    cut = len(text)
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text) - start), 0, -1):
            if n > len(text) - cut and text.endswith(marker[:n]):
                cut = len(text) - n
                break
    return cut
