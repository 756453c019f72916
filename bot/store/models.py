"""SQLAlchemy 2.0 models of the conversation store.

The schema is created only by the Alembic migrations in `migrations/`; these models must match them (a test
runs autogenerate's comparison). Every type is portable: the same schema runs on SQLite and PostgreSQL.

A message's content is a JSON list of parts, in order: `{"type": "text", "text": ...}` or
`{"type": "media", "sha256": ...}`. `message_media` links each message to the media rows it uses, so
"is this file still referenced?" is one indexed query instead of a scan of JSON.

`questions` holds each question from the moment it is accepted until it is finished (answered, or told
why not), with what is needed to answer it again after a restart; its row is completed in the same
transaction that records the answer.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only kind of time the store writes)."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Conversation(Base):
    """One conversation per scope (channel, thread, DM or CLI session)."""

    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope_key: Mapped[str] = mapped_column(String(128), unique=True)
    platform: Mapped[str] = mapped_column(String(16))
    guild_id: Mapped[int | None] = mapped_column(BigInteger)
    channel_id: Mapped[int] = mapped_column(BigInteger)
    thread_id: Mapped[int | None] = mapped_column(BigInteger)
    parent_conversation_id: Mapped[int | None] = mapped_column(
        ForeignKey("conversations.id", ondelete="SET NULL"), index=True
    )
    fork_from_discord_message_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Message(Base):
    """One user question or assistant answer; `position` orders a conversation (a turn = user + assistant)."""

    __tablename__ = "messages"
    __table_args__ = (
        # Also the index of the window query: WHERE conversation_id = ? ORDER BY position DESC LIMIT n.
        UniqueConstraint("conversation_id", "position"),
        UniqueConstraint("conversation_id", "discord_message_id"),
        CheckConstraint("role IN ('system', 'user', 'assistant')", name="role"),
        Index("ix_messages_discord_message_id", "discord_message_id"),
        Index("ix_messages_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[list[dict[str, str]]] = mapped_column(JSON)
    discord_message_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Media(Base):
    """An image or video file, content-addressed by sha256; `relative_path` is relative to the media dir."""

    __tablename__ = "media"
    __table_args__ = (CheckConstraint("kind IN ('image', 'video')", name="kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    relative_path: Mapped[str] = mapped_column(String(512))
    mime_type: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(8))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    byte_size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MessageMedia(Base):
    """Which media each message uses (one row per distinct file per message)."""

    __tablename__ = "message_media"

    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True)
    media_id: Mapped[int] = mapped_column(
        ForeignKey("media.id", ondelete="RESTRICT"), primary_key=True, index=True
    )


class Question(Base):
    """A question accepted on Discord: `pending` until its answer is recorded (`answered`, in the turn's
    transaction) and then shown in full (`shown`), or until it is refused with a sentence (`failed`) or given
    up after a restart (`expired`). `owner` names the process answering it; `reply_ids` are the Discord
    messages showing its answer, in order, as they are created."""

    __tablename__ = "questions"
    __table_args__ = (
        UniqueConstraint("conversation_id", "discord_message_id"),
        CheckConstraint("status IN ('pending', 'answered', 'shown', 'failed', 'expired')", name="status"),
        CheckConstraint("kind IN ('message', 'command')", name="kind"),
        Index("ix_questions_status_created_at", "status", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    discord_message_id: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))
    channel_id: Mapped[int] = mapped_column(BigInteger)  # where the question was asked
    reply_channel_id: Mapped[int] = mapped_column(BigInteger)  # where its answer goes (maybe a new thread)
    asker_id: Mapped[int] = mapped_column(BigInteger)
    text: Mapped[str] = mapped_column(Text)
    attachments: Mapped[list[dict[str, str | int | None]]] = mapped_column(JSON)
    attachments_message_id: Mapped[int | None] = mapped_column(BigInteger)  # the message carrying them
    media_paths: Mapped[list[str]] = mapped_column(JSON)  # their files once downloaded, under the media dir
    reply_ids: Mapped[list[int]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    owner: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
