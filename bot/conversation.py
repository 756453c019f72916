"""Stored history + a new question → the Qwen `messages` list, within the configured budget.

Pure data work: no Discord, no SQL, no torch. The budget rules, in order:
1. the system prompt comes first (when configured; otherwise the chat template's default applies);
2. the new question is always kept, with all its media;
3. older turns are kept newest first while they fit `history.max_turns` and `history.max_context_tokens`
   (the reply's `max_new_tokens` is reserved out of that budget); the oldest turns are dropped first;
4. at most `vision.max_images_in_context` images/videos are kept, newest first (the question's own count
   first and are kept even beyond it); media beyond that are dropped from old turns while their text stays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bot.content import ChatMessage, MediaPart, StoredMedia, TextPart
from bot.engine.api import QwenMessage, QwenPart
from bot.engine.budget import MESSAGE_OVERHEAD_TOKENS, image_tokens, video_tokens
from bot.settings import GenerationSettings, HistorySettings, VisionSettings

TextTokenCounter = Callable[[str], int]


def estimate_media_tokens(media: StoredMedia, vision: VisionSettings) -> int:
    """Visual tokens one image or video costs after resizing into the configured pixel range."""
    if media.kind == "video":
        frame_pixels = min(max(media.width * media.height, vision.min_pixels), vision.video_max_pixels)
        return video_tokens(frame_pixels, vision)
    return image_tokens(min(max(media.width * media.height, vision.min_pixels), vision.max_pixels))


def _media_part(media: StoredMedia, vision: VisionSettings) -> QwenPart:
    if media.kind == "video":
        return {
            "type": "video",
            "video": str(media.path),
            "max_frames": vision.video_max_frames,
            "fps": vision.video_fps,
            "max_pixels": vision.video_max_pixels,
        }
    return {"type": "image", "image": str(media.path)}


def _to_qwen(message: ChatMessage, kept_media: set[int], vision: VisionSettings) -> QwenMessage:
    content: list[QwenPart] = []
    for part in message.parts:
        if isinstance(part, TextPart):
            content.append({"type": "text", "text": part.text})
        elif id(part) in kept_media:
            content.append(_media_part(part.media, vision))
    return {"role": message.role, "content": content}


def _group_turns(history: Sequence[ChatMessage]) -> list[list[ChatMessage]]:
    """Split history into turns, each starting at a user message."""
    turns: list[list[ChatMessage]] = []
    for message in history:
        if message.role == "system":
            continue
        if message.role == "user" or not turns:
            turns.append([message])
        else:
            turns[-1].append(message)
    return turns


def build_messages(
    history: Sequence[ChatMessage],
    question: ChatMessage,
    *,
    vision: VisionSettings,
    history_settings: HistorySettings,
    generation: GenerationSettings,
    count_text_tokens: TextTokenCounter,
) -> list[QwenMessage]:
    """The Qwen `messages` list for `question` after `history` (oldest first), within budget."""

    def message_tokens(message: ChatMessage, with_media: bool) -> int:
        tokens = MESSAGE_OVERHEAD_TOKENS + count_text_tokens(message.text)
        if with_media:
            tokens += sum(estimate_media_tokens(media, vision) for media in message.media)
        return tokens

    budget = history_settings.max_context_tokens - (generation.max_new_tokens or 0)
    system: list[ChatMessage] = []
    if generation.system_prompt:
        system = [ChatMessage(role="system", parts=(TextPart(generation.system_prompt),))]
        budget -= message_tokens(system[0], with_media=False)

    media_left = vision.max_images_in_context
    kept_media: set[int] = set()

    def keep_media_of(message: ChatMessage, *, always: bool = False) -> int:
        """Mark the message's media kept while the image budget lasts (`always`: all of them, using up the
        budget); return their token cost."""
        nonlocal media_left
        cost = 0
        for part in reversed(message.parts):
            if isinstance(part, MediaPart) and (always or media_left > 0):
                kept_media.add(id(part))
                media_left -= 1
                cost += estimate_media_tokens(part.media, vision)
        return cost

    budget -= message_tokens(question, with_media=False) + keep_media_of(question, always=True)

    kept_turns: list[list[ChatMessage]] = []
    for turn in reversed(_group_turns(history)[-history_settings.max_turns :]):
        text_cost = sum(message_tokens(message, with_media=False) for message in turn)
        if text_cost > budget:
            break
        snapshot = (media_left, set(kept_media))
        media_cost = sum(keep_media_of(message) for message in reversed(turn))
        if text_cost + media_cost > budget:
            # The turn's text fits but not its media: keep the text, drop the media.
            media_left, kept_media = snapshot
            media_cost = 0
        budget -= text_cost + media_cost
        kept_turns.append(turn)

    ordered = [*system, *(message for turn in reversed(kept_turns) for message in turn), question]
    return [_to_qwen(message, kept_media, vision) for message in ordered]
