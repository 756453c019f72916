"""Context building: system first, newest turns kept, oldest dropped, old images dropped while text stays."""

from pathlib import Path

from bot.content import ChatMessage, MediaPart, StoredMedia, TextPart
from bot.conversation import build_messages, estimate_media_tokens
from bot.settings import GenerationSettings, HistorySettings, VisionSettings


def _image(name: str, size: int = 448) -> StoredMedia:
    return StoredMedia(
        sha256=name * 8,
        path=Path(f"/media/{name}.png"),
        mime_type="image/png",
        width=size,
        height=size,
        byte_size=100,
    )


def _user(text: str, *images: StoredMedia) -> ChatMessage:
    return ChatMessage(role="user", parts=(*(MediaPart(image) for image in images), TextPart(text)))


def _assistant(text: str) -> ChatMessage:
    return ChatMessage(role="assistant", parts=(TextPart(text),))


def _words(text: str) -> int:
    return len(text.split())


def _build(history, question, *, max_turns=20, max_tokens=8192, max_images=8, system="Be brief."):
    return build_messages(
        history,
        question,
        vision=VisionSettings(max_images_in_context=max_images),
        history_settings=HistorySettings(max_turns=max_turns, max_context_tokens=max_tokens),
        generation=GenerationSettings(max_new_tokens=100, system_prompt=system),
        count_text_tokens=_words,
    )


def _texts(messages) -> list[str]:
    return [part["text"] for message in messages for part in message["content"] if part["type"] == "text"]


def _images(messages) -> list[str]:
    return [part["image"] for message in messages for part in message["content"] if part["type"] == "image"]


def test_qwen_shape_with_system_first_and_image_before_text() -> None:
    messages = _build([_user("what is it?", _image("a")), _assistant("a cat")], _user("and its colour?"))
    assert messages == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [{"type": "image", "image": "/media/a.png"}, {"type": "text", "text": "what is it?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
        {"role": "user", "content": [{"type": "text", "text": "and its colour?"}]},
    ]


def test_no_system_prompt_leaves_the_template_default() -> None:
    messages = _build([], _user("hi"), system=None)
    assert [message["role"] for message in messages] == ["user"]


def test_oldest_turns_are_dropped_first_by_turn_count() -> None:
    history = [m for i in range(5) for m in (_user(f"q{i}"), _assistant(f"a{i}"))]
    messages = _build(history, _user("now"), max_turns=2)
    assert _texts(messages) == ["Be brief.", "q3", "a3", "q4", "a4", "now"]


def test_oldest_turns_are_dropped_first_by_token_budget() -> None:
    long = " ".join(["word"] * 200)
    history = [m for i in range(10) for m in (_user(f"q{i} {long}"), _assistant(f"a{i}"))]
    # 100 reserved for the reply, 7 system, 6 question, 212 per turn: room for two turns, not three.
    messages = _build(history, _user("now"), max_tokens=100 + 7 + 6 + 2 * 212 + 10)
    kept = _texts(messages)
    assert kept[-1] == "now" and kept[0] == "Be brief."
    assert [text.split()[0] for text in kept[1:-1:2]] == ["q8", "q9"]


def test_images_beyond_the_budget_are_dropped_from_old_turns_but_their_text_stays() -> None:
    history = [m for i in range(4) for m in (_user(f"q{i}", _image(f"i{i}")), _assistant(f"a{i}"))]
    messages = _build(history, _user("now", _image("new")), max_images=3)
    assert _images(messages) == ["/media/i2.png", "/media/i3.png", "/media/new.png"]
    assert _texts(messages)[1:] == ["q0", "a0", "q1", "a1", "q2", "a2", "q3", "a3", "now"]


def test_question_images_are_always_kept() -> None:
    messages = _build([], _user("compare", _image("x"), _image("y")), max_images=8)
    assert _images(messages) == ["/media/x.png", "/media/y.png"]


def test_question_images_are_kept_even_beyond_the_context_image_budget() -> None:
    history = [_user("before", _image("old")), _assistant("seen")]
    messages = _build(history, _user("compare", _image("x"), _image("y")), max_images=1)
    assert _images(messages) == ["/media/x.png", "/media/y.png"]  # the question's own, none from history
    assert _texts(messages)[1:] == ["before", "seen", "compare"]


def test_media_token_estimate_respects_pixel_bounds() -> None:
    vision = VisionSettings()
    small = estimate_media_tokens(_image("s", size=10), vision)
    huge = estimate_media_tokens(_image("h", size=20000), vision)
    assert small == vision.min_pixels // (28 * 28) + 2
    assert huge == vision.max_pixels // (28 * 28) + 2
