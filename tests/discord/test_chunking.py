"""The answer splitter: size limit, boundaries, code fences, unicode."""

from __future__ import annotations

import random
import re

import pytest

from bot.discord.chunking import DISCORD_MESSAGE_LIMIT, layout_answer, split_message

_FENCE_MARKER = re.compile(r"```[\w+#.-]*")


def _content(text: str) -> str:
    """The text without fence markers and whitespace: what must survive splitting unchanged."""
    return re.sub(r"\s+", "", _FENCE_MARKER.sub("", text))


def _assert_valid(text: str, chunks: list[str], limit: int) -> None:
    assert all(chunk.strip() for chunk in chunks)
    assert all(len(chunk) <= limit for chunk in chunks), [len(chunk) for chunk in chunks]
    assert all(chunk.count("```") % 2 == 0 for chunk in chunks), "every chunk must close its fences"
    assert _content("\n".join(chunks)) == _content(text)


def test_empty_and_whitespace_give_no_chunks() -> None:
    assert split_message("") == []
    assert split_message(" \n\t\n ") == []


def test_short_text_is_one_stripped_chunk() -> None:
    assert split_message("  Hello there.\n") == ["Hello there."]


def test_exactly_the_limit_is_one_chunk_and_one_more_is_two() -> None:
    assert split_message("x" * DISCORD_MESSAGE_LIMIT) == ["x" * DISCORD_MESSAGE_LIMIT]
    chunks = split_message("x" * (DISCORD_MESSAGE_LIMIT + 1))
    assert len(chunks) == 2
    assert "".join(chunks) == "x" * (DISCORD_MESSAGE_LIMIT + 1)


def test_prefers_paragraph_breaks() -> None:
    first, second = "A" * 60 + ".", "B" * 50 + "."
    text = f"{first}\n\n{second} more words here. And more."
    chunks = split_message(text, limit=100)
    assert chunks[0] == first
    _assert_valid(text, chunks, 100)


def test_prefers_sentence_ends_over_spaces() -> None:
    first = "This is the first sentence, and it goes on for a little while longer!"
    text = f"{first} " + "word " * 30
    chunks = split_message(text, limit=100)
    assert chunks[0] == first
    _assert_valid(text, chunks, 100)


def test_falls_back_to_spaces_then_hard_cuts() -> None:
    words = split_message("lorem ipsum dolor " * 20, limit=100)
    assert all(not chunk.endswith((" lor", " ip")) for chunk in words)
    assert all(chunk.split()[-1] in {"lorem", "ipsum", "dolor"} for chunk in words)
    unbroken = "z" * 250
    chunks = split_message(unbroken, limit=100)
    assert "".join(chunks) == unbroken
    assert [len(chunk) for chunk in chunks] == [96, 96, 58]


def test_code_block_spanning_messages_is_closed_and_reopened_with_its_language() -> None:
    code_lines = "\n".join(f"value_{i} = compute({i})  # step {i}" for i in range(60))
    text = f"Here is the code:\n\n```python\n{code_lines}\n```\nThat's it."
    chunks = split_message(text, limit=500)
    assert len(chunks) > 2
    assert chunks[0].startswith("Here is the code:")
    for chunk in chunks[:-1]:
        assert chunk.endswith("\n```")
    for chunk in chunks[1:]:
        assert chunk.startswith("```python\n")
    assert chunks[-1].endswith("```\nThat's it.")
    _assert_valid(text, chunks, 500)
    # Code lines are never cut in the middle.
    for chunk in chunks:
        for line in chunk.splitlines():
            assert line.startswith(("value_", "```", "Here", "That")) or not line


def test_bare_fence_is_reopened_bare() -> None:
    text = "```\n" + "\n".join(f"line {i:03d} of plain code" for i in range(40)) + "\n```"
    chunks = split_message(text, limit=300)
    assert len(chunks) > 1
    assert all(chunk.startswith("```\n") for chunk in chunks)
    _assert_valid(text, chunks, 300)


def test_a_fence_opening_at_a_boundary_moves_to_the_next_chunk() -> None:
    text = "p" * 85 + "\n```js\n" + "x" * 150 + "\n```"
    chunks = split_message(text, limit=100)
    assert chunks[0] == "p" * 85
    assert chunks[1].startswith("```js\nxxx")
    _assert_valid(text, chunks, 100)


def test_never_cuts_inside_a_fence_marker() -> None:
    text = "q" * 95 + "```py\nprint(1)\n```"
    chunks = split_message(text, limit=100)
    assert all("``" not in chunk.replace("```", "") for chunk in chunks)
    _assert_valid(text, chunks, 100)


def test_unicode_is_kept_whole() -> None:
    text = "日本語の文です。" * 150 + " 🎉👍🏽 " * 200
    chunks = split_message(text)
    _assert_valid(text, chunks, DISCORD_MESSAGE_LIMIT)
    assert chunks[0].endswith("。")
    assert "".join(chunks).count("🎉") == 200


def test_tiny_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        split_message("hello", limit=10)


@pytest.mark.parametrize("limit", [60, 120, 500, DISCORD_MESSAGE_LIMIT])
def test_random_documents_split_validly(limit: int) -> None:
    rng = random.Random(limit)
    pieces = ["word", "Sentence ends.", "Question?", "\n", "\n\n", "x" * 300, "é", "🙂", "日本", "`inline`"]
    for _ in range(40):
        parts: list[str] = []
        for _ in range(rng.randint(1, 400)):
            if rng.random() < 0.03:
                language = rng.choice(["", "python", "c++", "sh"])
                body = "\n".join(rng.choice(["a = 1", "  indented()", "x" * 90, ""]) for _ in range(30))
                parts.append(f"\n```{language}\n{body}\n```\n")
            else:
                parts.append(rng.choice(pieces))
        text = " ".join(parts)
        _assert_valid(text, split_message(text, limit=limit), limit)


def test_an_answer_within_max_messages_is_split_and_a_longer_one_becomes_a_file() -> None:
    three_messages = "\n\n".join("Sentence one. " * 130 for _ in range(3))
    assert len(split_message(three_messages)) == 3
    assert layout_answer(three_messages, max_messages=3).file_text is None
    layout = layout_answer(three_messages, max_messages=2)
    assert layout.file_text == three_messages and len(layout.messages) == 1
    assert layout.messages[0].startswith("Sentence one.") and "answer.md" in layout.messages[0]
    streaming = layout_answer(three_messages, max_messages=2, final=False)
    assert streaming.file_text is None and "it will come as a file" in streaming.messages[0]


def test_a_code_block_too_long_for_one_message_becomes_a_file() -> None:
    code = "```python\n" + "print('hello')\n" * 140 + "```"
    assert layout_answer(f"Here it is:\n{code}\nDone.", max_messages=3).file_text is not None
    short_blocks = f"```\n{'x = 1' * 300}\n```\ntext\n" * 2  # two blocks, each fits one message
    assert layout_answer(short_blocks, max_messages=3).file_text is None
    unclosed = "```\n" + "y = 2\n" * 400  # an unclosed fence runs to the end
    assert layout_answer(unclosed, max_messages=3).file_text is not None
