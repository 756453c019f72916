"""Split a long answer into Discord-sized messages without breaking ``` code fences, or lay it out as a file.

An answer that would take more than a configured number of messages, or holds a code block too long for one
message, goes out as a short preview plus the whole answer as `answer.md` (`layout_answer`).
Cuts prefer, in order: a blank line, a line break, the end of a sentence, a space; only text with none of
those in reach is cut hard. A code block that must span messages is closed at the end of one message and
reopened (with its language) at the start of the next, so every message renders on its own.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

DISCORD_MESSAGE_LIMIT = 2000
ANSWER_FILE_NAME = "answer.md"
# Discord's smallest upload limit (a server without boosts) is 10 MiB; a larger answer is sent as messages.
ANSWER_FILE_MAX_BYTES = 8 * 1024 * 1024
PREVIEW_LIMIT = 1500  # the preview's share of the first message; the rest is for the note below it
FENCE = "```"
_CLOSE = "\n" + FENCE
_MAX_LANGUAGE = 24  # a longer "language" is probably not one; reopening without it keeps chunks small
_LANGUAGE = re.compile(rf"[\w+#.-]{{1,{_MAX_LANGUAGE}}}")
_SENTENCE_END = re.compile(r"[.!?…][\"')\]]*(?=\s)|[。！？]")
_MIN_SHARE = 0.5  # a boundary is used only if the chunk keeps at least this share of its budget


@dataclass(frozen=True, slots=True)
class AnswerLayout:
    """How an answer shows: its messages, and the whole text as `answer.md` when it is too long for them."""

    messages: list[str]
    file_text: str | None = None


def layout_answer(text: str, *, max_messages: int, final: bool = True) -> AnswerLayout:
    """The messages showing `text`: split as needed, or, when that takes more than `max_messages` messages or
    cuts a code block, a preview with a note (the attachment only once `final`: while the answer streams,
    the note says it is still being written)."""
    messages = split_message(text)
    if len(text.encode()) > ANSWER_FILE_MAX_BYTES or (
        len(messages) <= max_messages and not _has_long_code_block(text)
    ):
        return AnswerLayout(messages)
    preview = split_message(text, PREVIEW_LIMIT)[0]
    if final:
        return AnswerLayout([f"{preview}\n\n-# 📎 The whole answer is attached as {ANSWER_FILE_NAME}."], text)
    pages = math.ceil(len(text) / DISCORD_MESSAGE_LIMIT)
    return AnswerLayout(
        [f"{preview}\n\n-# ✍️ Still writing (about {pages} messages long); it will come as a file."]
    )


def _has_long_code_block(text: str) -> bool:
    """Whether a ``` code block of `text` (an unclosed one runs to the end) is too long for one message."""
    fences = [match.start() for match in re.finditer(FENCE, text)]
    blocks = zip(fences[::2], [*fences[1::2], len(text)], strict=False)
    return any(end + len(FENCE) - start > DISCORD_MESSAGE_LIMIT for start, end in blocks)


def split_message(text: str, limit: int = DISCORD_MESSAGE_LIMIT) -> list[str]:
    """Split `text` into non-empty chunks of at most `limit` characters; whitespace-only text gives []."""
    if limit < 2 * len(_CLOSE) + _MAX_LANGUAGE + 8:
        raise ValueError(f"limit {limit} is too small to carry code fences")
    chunks: list[str] = []
    rest = text.strip()
    language: str | None = None  # the open fence's language ("" for a bare fence), None outside a fence
    while rest:
        prefix = "" if language is None else f"{FENCE}{language}\n"
        if len(prefix) + len(rest) <= limit:
            chunks.append(prefix + rest)
            break
        budget = limit - len(prefix) - len(_CLOSE)
        cut = _find_cut(rest, budget, inside_fence=language is not None)
        body, rest = rest[:cut], rest[cut:]
        language = _fence_state_after(body, language)
        if language is None:
            body, rest = body.rstrip(), rest.lstrip()
            chunk = prefix + body
        else:
            body, rest = body.rstrip("\n"), rest.lstrip("\n")
            chunk = prefix + body + _CLOSE
        chunks.append(chunk)
    return chunks


def _find_cut(text: str, budget: int, *, inside_fence: bool) -> int:
    """Where to end the next chunk: an index in (0, budget] that is not inside a ``` marker."""
    floor = int(budget * _MIN_SHARE)
    candidates = [_after_last(text, "\n\n", floor, budget), _after_last(text, "\n", floor, budget)]
    if not inside_fence:  # inside code only line breaks are safe places to cut
        candidates += [_last_sentence_end(text, floor, budget), _after_last(text, " ", floor, budget)]
    cut = next((candidate for candidate in candidates if candidate is not None), budget)
    return _before_fence_opening(text, _avoid_marker(text, cut), inside_fence=inside_fence)


def _after_last(text: str, separator: str, floor: int, budget: int) -> int | None:
    index = text.rfind(separator, floor, budget)
    return index + len(separator) if index >= 0 else None


def _last_sentence_end(text: str, floor: int, budget: int) -> int | None:
    ends = [match.end() for match in _SENTENCE_END.finditer(text, floor, budget + 1) if match.end() <= budget]
    return ends[-1] if ends else None


def _before_fence_opening(text: str, cut: int, *, inside_fence: bool) -> int:
    """Keep a fence that opens on the chunk's last line for the next chunk instead of leaving it empty."""
    line_start = text.rfind("\n", 0, cut - 1) + 1
    opens_here = _fence_state_after(text[:cut], None if not inside_fence else "") is not None
    if line_start > 0 and text.startswith(FENCE, line_start) and opens_here:
        return line_start
    return cut


def _avoid_marker(text: str, cut: int) -> int:
    """Move a cut that falls inside a run of backticks to before the run (when that leaves something)."""
    if cut >= len(text) or text[cut] != "`" or text[cut - 1] != "`":
        return cut
    start = cut
    while start > 0 and text[start - 1] == "`":
        start -= 1
    return start if start > 0 else cut


def _fence_state_after(body: str, language: str | None) -> str | None:
    """The open fence's language after `body`, given the state before it (None: outside any fence)."""
    index = body.find(FENCE)
    while index != -1:
        after = index + len(FENCE)
        if language is None:
            line_end = body.find("\n", after)
            word = body[after : line_end if line_end != -1 else len(body)].strip()
            language = word if line_end != -1 and _LANGUAGE.fullmatch(word) else ""
        else:
            language = None
        index = body.find(FENCE, after)
    return language
