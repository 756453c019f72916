"""Small plain data in and out of store operations (never ORM objects)."""

from __future__ import annotations

from dataclasses import dataclass

from bot.content import ChatMessage


@dataclass(frozen=True, slots=True)
class NewTurn:
    """A question and its answer, to be recorded together (`ConversationStore.record_turn`)."""

    question: ChatMessage  # role "user", with its media parts
    answer_text: str
    question_discord_id: int | None = None  # a repeated id records nothing: Discord may deliver twice
    answer_discord_id: int | None = None


@dataclass(frozen=True, slots=True)
class RecordedTurn:
    """The ids of a recorded question and its answer; `duplicate` when the question was already stored."""

    user_message_id: int
    assistant_message_id: int
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class ForgetResult:
    """What `forget` deleted: the conversation's messages and the media files nothing references anymore."""

    messages_deleted: int
    media_deleted: int


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """What the retention purge deleted, across all conversations.

    `orphan_files_deleted` counts files under the media dir that no media row referenced (stored for a
    question that then failed) and that were older than the grace period.
    """

    messages_deleted: int
    media_deleted: int
    orphan_files_deleted: int = 0


@dataclass(frozen=True, slots=True)
class ConversationStats:
    """Whole turns stored in a conversation, and the images and videos its questions carried."""

    turns: int
    images: int
    videos: int = 0
