"""Small plain data in and out of store operations (never ORM objects)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from bot.content import ChatMessage, ConversationScope

QuestionKind = Literal["message", "command"]
FinalStatus = Literal["shown", "failed", "expired"]  # "answered" is written only by `record_turn`


@dataclass(frozen=True, slots=True)
class NewTurn:
    """A question and its answer, to be recorded together (`ConversationStore.record_turn`)."""

    question: ChatMessage  # role "user", with its media parts
    answer_text: str
    question_discord_id: int | None = None  # a repeated id records nothing: Discord may deliver twice
    answer_discord_id: int | None = None
    question_id: int | None = None  # the durable question this answers: completed in the same transaction


@dataclass(frozen=True, slots=True)
class NewQuestion:
    """A question to keep until it is finished (`ConversationStore.accept_question`).

    `attachments` are the announced attachments (url, filename, size, content_type) of the message
    `attachments_message_id`, which is fetched again for fresh URLs when the question is answered again.
    """

    discord_message_id: int
    kind: QuestionKind
    channel_id: int  # where it was asked
    reply_channel_id: int  # where the answer goes: the same channel, or a thread opened for it
    asker_id: int
    text: str
    attachments: tuple[dict[str, str | int | None], ...] = ()
    attachments_message_id: int | None = None


@dataclass(frozen=True, slots=True)
class UnfinishedQuestion:
    """A pending question as stored, with its conversation's scope and the reply messages made so far."""

    id: int
    scope: ConversationScope
    question: NewQuestion
    reply_ids: tuple[int, ...]
    owner: str
    created_at: datetime
    answer_text: str | None = None  # recorded, not yet shown in full: show this rather than answer again
    media_files: tuple[Path, ...] = ()  # its attachments as downloaded, when every file is still on disk


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
