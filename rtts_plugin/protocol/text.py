"""Splitting text into pieces no longer than a limit, at the most natural boundary.

Used by the plugin for text over a voice's per-connection limit and by the local engine to
synthesize long text piece by piece. A cut is made, in order of preference, after a
sentence end, after a clause mark, at white space, and only as a last resort at a plain
character boundary (which for Chinese, written without spaces, is where a word may end).
Limits count characters (code points), as the cloud does, never bytes.
"""

from __future__ import annotations

import re
from typing import Final

_SENTENCE_END: Final = re.compile(r"[.!?…。！？；;\n]+[\"'”’)\]）】」』]*\s*")
_CLAUSE_END: Final = re.compile(r"[,:，、：—–]+\s*")
_SPACE: Final = re.compile(r"\s+")


def _last_cut(window: str, pattern: re.Pattern[str], limit: int) -> int:
    """Where to cut ``window`` after the last ``pattern`` match: 0 if no match fits."""
    for match in reversed(list(pattern.finditer(window))):
        kept = window[: match.end()].rstrip()
        if kept and len(kept) <= limit:
            return match.end()
    return 0


def split_text(text: str, limit: int) -> list[str]:
    """Split ``text`` into non-blank pieces of at most ``limit`` characters, in order.

    White space at a cut is dropped (it only separated the pieces); every other character
    of ``text`` appears exactly once, in its place. Blank input gives an empty list.

    Raises:
        ValueError: if ``limit`` is smaller than 1.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1 character, got {limit}")
    pieces: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        # One character past the limit: a sentence end or space right there is a clean cut.
        window = rest[: limit + 1]
        cut = (
            _last_cut(window, _SENTENCE_END, limit)
            or _last_cut(window, _CLAUSE_END, limit)
            or _last_cut(window, _SPACE, limit)
            or limit
        )
        pieces.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        pieces.append(rest)
    return pieces
