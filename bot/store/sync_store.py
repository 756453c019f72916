"""The store's synchronous work: one method per `ConversationStore` operation, each one transaction.

Only the store's database thread calls this class. Writes that can race another process (get-or-create by a
unique key, a question recorded twice, two questions taking the same next position) rely on the unique
constraints: after an `IntegrityError` they look the winner up, or try the write again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Delete, Engine, Update, delete, exists, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from bot.content import ChatMessage, ConversationScope, MediaKind, Platform, Role, StoredMedia, TextPart
from bot.media.storage import content_digest
from bot.store.database import lock_wait
from bot.store.models import Conversation, Media, Message, MessageMedia, Question, utcnow
from bot.store.orphans import sweep_orphan_files
from bot.store.parts import decode_parts, encode_parts, media_hashes
from bot.store.results import (
    ConversationStats,
    FinalStatus,
    ForgetResult,
    NewQuestion,
    NewTurn,
    PurgeResult,
    QuestionKind,
    RecordedTurn,
    UnfinishedQuestion,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
_CHUNK = 500  # ids per IN list, well under every database's bound-parameter limit
_WRITE_ATTEMPTS = 5  # tries of a turn write that loses races to other processes


class SyncStore:
    """Conversation storage over sync sessions; returns plain data only."""

    def __init__(self, engine: Engine, media_dir: Path) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._media_dir = media_dir.absolute()
        self._media_root = media_dir.resolve()

    def ping(self) -> None:
        """`SELECT 1`; raises when the database cannot be reached."""
        with self._sessions() as session:
            session.execute(select(1))

    # -- conversations -------------------------------------------------------------------------------------

    def find_conversation(self, scope: ConversationScope) -> int | None:
        with self._sessions() as session:
            return _conversation_id(session, scope.key)

    def conversation_for(self, scope: ConversationScope) -> int:
        def create(session: Session) -> int:
            return _add_conversation(session, scope).id

        return self._get_or_create(scope, create)

    def fork_thread(
        self, parent_id: int, from_discord_id: int | None, thread_scope: ConversationScope, max_messages: int
    ) -> int:
        def create(session: Session) -> int:
            if session.get(Conversation, parent_id) is None:
                raise LookupError(f"no conversation with id {parent_id}")
            thread = _add_conversation(session, thread_scope, parent_id, from_discord_id)
            end = _fork_end(session, parent_id, from_discord_id)
            _copy_messages(session, parent_id, thread.id, end, max_messages)
            return thread.id

        return self._get_or_create(thread_scope, create)

    def _get_or_create(self, scope: ConversationScope, create: Callable[[Session], int]) -> int:
        try:
            with self._sessions.begin() as session:
                existing = _conversation_id(session, scope.key)
                return existing if existing is not None else create(session)
        except IntegrityError:
            # Another process created the same scope between our lookup and our insert.
            winner = self.find_conversation(scope)
            if winner is None:
                raise
            return winner

    # -- messages ------------------------------------------------------------------------------------------

    def is_recorded(self, conversation_id: int, discord_id: int) -> bool:
        with self._sessions() as session:
            query = select(Message.id).where(
                Message.conversation_id == conversation_id, Message.discord_message_id == discord_id
            )
            return session.scalar(select(exists(query))) or False

    def record_turn(
        self, conversation_id: int, turn: NewTurn, lock_wait_ms: int | None = None
    ) -> RecordedTurn:
        """One transaction; with `lock_wait_ms`, SQLite waits at most that long for another writer's lock."""
        question_discord_id = turn.question_discord_id
        if turn.question.role != "user":
            raise ValueError(f"a turn's question must have the user role, not {turn.question.role!r}")
        attempts_left = _WRITE_ATTEMPTS
        while True:
            try:
                with self._sessions.begin() as session, lock_wait(session, lock_wait_ms):
                    _complete_question(session, turn.question_id)
                    if question_discord_id is not None:
                        existing = _recorded_turn(session, conversation_id, question_discord_id)
                        if existing is not None:
                            return existing
                    return self._insert_turn(session, conversation_id, turn)
            except IntegrityError:
                # Another process committed first: the same question (found as a duplicate next time), another
                # question at the same position, or the same new media row. The next attempt sees its rows.
                attempts_left -= 1
                if attempts_left == 0:
                    raise

    def _insert_turn(
        self,
        session: Session,
        conversation_id: int,
        turn: NewTurn,
    ) -> RecordedTurn:
        question = turn.question
        conversation = session.get(Conversation, conversation_id)
        if conversation is None:
            raise LookupError(f"no conversation with id {conversation_id}")
        now = utcnow()  # one timestamp per turn, so the retention purge always removes whole turns
        media_ids = self._upsert_media(session, question.media)
        position = _next_position(session, conversation_id)
        user = Message(
            conversation_id=conversation_id,
            position=position,
            role="user",
            content=encode_parts(question.parts),
            discord_message_id=turn.question_discord_id,
            created_at=now,
        )
        assistant = Message(
            conversation_id=conversation_id,
            position=position + 1,
            role="assistant",
            content=encode_parts((TextPart(turn.answer_text),)),
            discord_message_id=turn.answer_discord_id,
            created_at=now,
        )
        session.add_all([user, assistant])
        session.flush()
        _link_media(session, user.id, media_ids)
        conversation.updated_at = now
        return RecordedTurn(user.id, assistant.id)

    # -- durable questions ---------------------------------------------------------------------------------

    def accept_question(self, conversation_id: int, new: NewQuestion, owner: str) -> int | None:
        """Keep `new` as pending for `owner`; None when that Discord message is already recorded as a turn
        or already kept (answered, refused, or pending in some process): a re-delivery, to be ignored."""
        try:
            with self._sessions.begin() as session:
                if _recorded_turn(session, conversation_id, new.discord_message_id) is not None:
                    return None
                if _question_id(session, conversation_id, new.discord_message_id) is not None:
                    return None
                row = Question(
                    conversation_id=conversation_id,
                    discord_message_id=new.discord_message_id,
                    kind=new.kind,
                    channel_id=new.channel_id,
                    reply_channel_id=new.reply_channel_id,
                    asker_id=new.asker_id,
                    text=new.text,
                    attachments=[dict(ref) for ref in new.attachments],
                    attachments_message_id=new.attachments_message_id,
                    media_paths=[],
                    reply_ids=[],
                    status="pending",
                    owner=owner,
                )
                session.add(row)
                session.flush()
                return row.id
        except IntegrityError:  # another process kept the same question first
            return None

    def note_reply(self, question_id: int, discord_id: int) -> None:
        with self._sessions.begin() as session:
            row = session.get(Question, question_id)
            if row is not None and discord_id not in row.reply_ids:
                row.reply_ids = [*row.reply_ids, discord_id]

    def note_media(self, question_id: int, paths: Sequence[Path]) -> None:
        with self._sessions.begin() as session:
            row = session.get(Question, question_id)
            if row is not None:
                row.media_paths = [self._relative_path(path) for path in paths]

    def finish_question(self, question_id: int, status: FinalStatus) -> None:
        before = "answered" if status == "shown" else "pending"
        with self._sessions.begin() as session:
            session.execute(
                update(Question)
                .where(Question.id == question_id, Question.status == before)
                .values(status=status)
            )

    def unfinished_questions(self, not_owner: str) -> list[UnfinishedQuestion]:
        with self._sessions() as session:
            rows = session.execute(
                select(Question, Conversation)
                .join(Conversation, Conversation.id == Question.conversation_id)
                .where(Question.status.in_(("pending", "answered")), Question.owner != not_owner)
                .order_by(Question.created_at, Question.id)
            ).all()
            return [
                _unfinished(
                    question, conversation, _answer_text(session, question), self._media_files(question)
                )
                for question, conversation in rows
            ]

    def claim_question(self, question_id: int, from_owner: str, owner: str) -> bool:
        with self._sessions.begin() as session:
            statement = (
                update(Question)
                .where(
                    Question.id == question_id,
                    Question.status.in_(("pending", "answered")),
                    Question.owner == from_owner,
                )
                .values(owner=owner)
            )
            return _rowcount(session, statement) > 0

    def _media_files(self, question: Question) -> tuple[Path, ...]:
        """The question's downloaded files, or none unless every one is still on disk."""
        paths = tuple(self._media_dir / relative for relative in question.media_paths)
        return paths if all(path.is_file() for path in paths) else ()

    def set_answer_discord_id(self, assistant_message_id: int, discord_id: int) -> bool:
        with self._sessions.begin() as session:
            statement = (
                update(Message)
                .where(Message.id == assistant_message_id, Message.role == "assistant")
                .values(discord_message_id=discord_id)
            )
            return _rowcount(session, statement) > 0

    def load_window(self, conversation_id: int, max_messages: int) -> list[ChatMessage]:
        if max_messages <= 0:
            return []
        with self._sessions() as session:
            query = (
                select(Message.role, Message.content)
                .where(Message.conversation_id == conversation_id)
                .order_by(Message.position.desc())
                .limit(max_messages)
            )
            rows = _whole_turns(list(reversed(session.execute(query).all())))
            hashes = set().union(*(media_hashes(content) for _, content in rows))
            media = self._media_by_hash(session, hashes)
        return [ChatMessage(cast(Role, role), decode_parts(content, media)) for role, content in rows]

    # -- deletion ------------------------------------------------------------------------------------------

    def forget(self, conversation_id: int, keep_files: Collection[str] = ()) -> ForgetResult:
        with self._sessions.begin() as session:
            message_ids = select(Message.id).where(Message.conversation_id == conversation_id)
            used = set(
                session.scalars(select(MessageMedia.media_id).where(MessageMedia.message_id.in_(message_ids)))
            )
            session.execute(delete(MessageMedia).where(MessageMedia.message_id.in_(message_ids)))
            deleted = _rowcount(session, delete(Message).where(Message.conversation_id == conversation_id))
            paths = _delete_orphan_media(session, used)
            session.execute(
                update(Conversation).where(Conversation.id == conversation_id).values(updated_at=utcnow())
            )
        self._unlink(paths, keep_files)
        return ForgetResult(messages_deleted=deleted, media_deleted=len(paths))

    def purge_older_than(
        self, days: int | None, orphan_grace: timedelta, keep_files: Collection[str] = ()
    ) -> PurgeResult:
        deleted = 0
        with self._sessions.begin() as session:
            if days is not None:
                cutoff = utcnow() - timedelta(days=days)
                old_ids = select(Message.id).where(Message.created_at < cutoff)
                session.execute(delete(MessageMedia).where(MessageMedia.message_id.in_(old_ids)))
                deleted = _rowcount(session, delete(Message).where(Message.created_at < cutoff))
                session.execute(
                    delete(Question).where(
                        Question.created_at < cutoff, Question.status.not_in(("pending", "answered"))
                    )
                )
            paths = _delete_orphan_media(session, None)
        self._unlink(paths, keep_files)
        orphans = sweep_orphan_files(self._media_root, self._referenced_paths, orphan_grace)
        return PurgeResult(messages_deleted=deleted, media_deleted=len(paths), orphan_files_deleted=orphans)

    def stats(self, conversation_id: int) -> ConversationStats:
        with self._sessions() as session:
            turns = session.scalar(
                select(func.count(Message.id)).where(
                    Message.conversation_id == conversation_id, Message.role == "user"
                )
            )
            kinds = session.execute(
                select(Media.kind, func.count())
                .select_from(MessageMedia)
                .join(Message, Message.id == MessageMedia.message_id)
                .join(Media, Media.id == MessageMedia.media_id)
                .where(Message.conversation_id == conversation_id)
                .group_by(Media.kind)
            )
            counts = dict(kinds.all())
        return ConversationStats(
            turns=turns or 0, images=counts.get("image", 0), videos=counts.get("video", 0)
        )

    # -- media ---------------------------------------------------------------------------------------------

    def _upsert_media(self, session: Session, media: Sequence[StoredMedia]) -> list[int]:
        """The ids of these files' media rows, inserting the missing ones (one row per sha256)."""
        unique = {item.sha256: item for item in media}
        if not unique:
            return []
        known = select(Media.sha256, Media.id).where(Media.sha256.in_(unique))
        ids = dict(session.execute(known).all())
        for sha256, item in unique.items():
            if sha256 not in ids:
                row = Media(
                    sha256=sha256,
                    relative_path=self._relative_path(item.path),
                    mime_type=item.mime_type,
                    kind=item.kind,
                    width=item.width,
                    height=item.height,
                    byte_size=item.byte_size,
                )
                session.add(row)
                session.flush()
                ids[sha256] = row.id
        return [ids[sha256] for sha256 in unique]

    def _media_by_hash(self, session: Session, hashes: set[str]) -> dict[str, StoredMedia | None]:
        """The stored media of these hashes; None for a file gone from disk.

        A file can vanish under a recorded turn: `forget` or the purge elsewhere deletes a file that a
        question in flight had just downloaded again (the same picture), before that turn is recorded. Such
        a part is dropped from the window, so the conversation goes on without that image instead of failing
        every later question; the same picture posted again is stored afresh.
        """
        if not hashes:
            return {}
        rows = session.scalars(select(Media).where(Media.sha256.in_(hashes)))
        media: dict[str, StoredMedia | None] = {}
        for row in rows:
            stored = self._stored_media(row)
            if stored.path.is_file():
                media[row.sha256] = stored
            else:
                log.warning("media file %s is missing; leaving it out of the conversation", row.relative_path)
                media[row.sha256] = None
        return media

    def _stored_media(self, row: Media) -> StoredMedia:
        return StoredMedia(
            sha256=row.sha256,
            path=self._media_dir / row.relative_path,
            mime_type=row.mime_type,
            width=row.width,
            height=row.height,
            byte_size=row.byte_size,
            kind=cast(MediaKind, row.kind),
        )

    def _relative_path(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(self._media_root).as_posix()
        except ValueError:
            raise ValueError(f"media file {path} is outside the media directory {self._media_dir}") from None

    def _referenced_paths(self, relative_paths: Collection[str]) -> set[str]:
        """Those of these paths (relative to the media dir) that a media row uses."""
        candidates = list(relative_paths)
        used: set[str] = set()
        with self._sessions() as session:
            for start in range(0, len(candidates), _CHUNK):
                chunk = candidates[start : start + _CHUNK]
                used.update(
                    session.scalars(select(Media.relative_path).where(Media.relative_path.in_(chunk)))
                )
        return used

    def _unlink(self, relative_paths: Iterable[str], keep_files: Collection[str]) -> None:
        """Delete files whose rows are gone (after the commit: a failed transaction never loses a file).

        Files whose sha256 is in `keep_files` stay: a question in flight holds them and will record them
        again; should it fail instead, the orphan sweep removes them later.
        """
        for relative_path in relative_paths:
            if content_digest(relative_path) in keep_files:
                continue
            try:
                (self._media_dir / relative_path).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not delete media file %s: %s", relative_path, exc)


def _conversation_id(session: Session, key: str) -> int | None:
    return session.scalar(select(Conversation.id).where(Conversation.scope_key == key))


def _add_conversation(
    session: Session,
    scope: ConversationScope,
    parent_id: int | None = None,
    fork_from_discord_id: int | None = None,
) -> Conversation:
    conversation = Conversation(
        scope_key=scope.key,
        platform=scope.platform,
        guild_id=scope.guild_id,
        channel_id=scope.channel_id,
        thread_id=scope.thread_id,
        parent_conversation_id=parent_id,
        fork_from_discord_message_id=fork_from_discord_id,
    )
    session.add(conversation)
    session.flush()
    return conversation


def _recorded_turn(session: Session, conversation_id: int, question_discord_id: int) -> RecordedTurn | None:
    """The stored turn whose question has this Discord id, if any."""
    question = session.execute(
        select(Message.id, Message.position).where(
            Message.conversation_id == conversation_id,
            Message.discord_message_id == question_discord_id,
            Message.role == "user",
        )
    ).first()
    if question is None:
        return None
    answer_id = session.scalar(
        select(Message.id).where(
            Message.conversation_id == conversation_id, Message.position == question.position + 1
        )
    )
    return RecordedTurn(question.id, answer_id if answer_id is not None else question.id, duplicate=True)


def _question_id(session: Session, conversation_id: int, discord_id: int) -> int | None:
    return session.scalar(
        select(Question.id).where(
            Question.conversation_id == conversation_id, Question.discord_message_id == discord_id
        )
    )


def _complete_question(session: Session, question_id: int | None) -> None:
    """Mark the durable question answered (in the transaction that records its turn)."""
    if question_id is not None:
        session.execute(
            update(Question)
            .where(Question.id == question_id, Question.status == "pending")
            .values(status="answered")
        )


def _answer_text(session: Session, question: Question) -> str | None:
    """The recorded answer of an `answered` question (None for a pending one)."""
    if question.status != "answered":
        return None
    turn = _recorded_turn(session, question.conversation_id, question.discord_message_id)
    answer = session.get(Message, turn.assistant_message_id) if turn is not None else None
    if answer is None or answer.role != "assistant":
        return ""  # forgotten meanwhile (a /reset): nothing left to show
    return "".join(part["text"] for part in answer.content if part["type"] == "text")


def _unfinished(
    question: Question, conversation: Conversation, answer_text: str | None, media_files: tuple[Path, ...]
) -> UnfinishedQuestion:
    scope = ConversationScope(
        cast(Platform, conversation.platform),
        conversation.channel_id,
        conversation.guild_id,
        conversation.thread_id,
    )
    return UnfinishedQuestion(
        id=question.id,
        scope=scope,
        question=NewQuestion(
            discord_message_id=question.discord_message_id,
            kind=cast(QuestionKind, question.kind),
            channel_id=question.channel_id,
            reply_channel_id=question.reply_channel_id,
            asker_id=question.asker_id,
            text=question.text,
            attachments=tuple(question.attachments),
            attachments_message_id=question.attachments_message_id,
        ),
        reply_ids=tuple(question.reply_ids),
        owner=question.owner,
        created_at=_aware(question.created_at),
        answer_text=answer_text,
        media_files=media_files,
    )


def _aware(moment: datetime) -> datetime:
    """`moment` as UTC-aware (SQLite hands back the naive UTC time it stored)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _next_position(session: Session, conversation_id: int) -> int:
    last = session.scalar(
        select(func.max(Message.position)).where(Message.conversation_id == conversation_id)
    )
    return 0 if last is None else last + 1


def _link_media(session: Session, message_id: int, media_ids: Sequence[int]) -> None:
    if media_ids:
        session.execute(insert(MessageMedia), [{"message_id": message_id, "media_id": m} for m in media_ids])


def _whole_turns(rows: Sequence[tuple[str, T]]) -> list[tuple[str, T]]:
    """Drop leading (role, ...) rows up to the first question: a window never opens with an orphan answer."""
    start = next((i for i, (role, _) in enumerate(rows) if role == "user"), len(rows))
    return list(rows[start:])


def _fork_end(session: Session, parent_id: int, from_discord_id: int | None) -> int | None:
    """The last position of the parent's turn holding that Discord message; None means the whole history."""
    if from_discord_id is None:
        return None
    position = session.scalar(
        select(Message.position).where(
            Message.conversation_id == parent_id, Message.discord_message_id == from_discord_id
        )
    )
    if position is None:
        return None
    next_question = session.scalar(
        select(func.min(Message.position)).where(
            Message.conversation_id == parent_id, Message.role == "user", Message.position > position
        )
    )
    return None if next_question is None else next_question - 1


def _copy_messages(session: Session, source_id: int, target_id: int, end: int | None, limit: int) -> None:
    """Copy the newest whole turns (at most `limit` messages) of the source up to position `end`."""
    if limit <= 0:
        return
    query = select(Message).where(Message.conversation_id == source_id)
    if end is not None:
        query = query.where(Message.position <= end)
    newest = session.scalars(query.order_by(Message.position.desc()).limit(limit)).all()
    sources = _whole_turns([(m.role, m) for m in reversed(newest)])
    copies = [
        Message(
            conversation_id=target_id,
            position=position,
            role=message.role,
            content=[dict(part) for part in message.content],
            discord_message_id=None,
            created_at=message.created_at,  # the copy ages with the original under the retention purge
        )
        for position, (_, message) in enumerate(sources)
    ]
    session.add_all(copies)
    session.flush()
    copy_of = {message.id: copy.id for (_, message), copy in zip(sources, copies, strict=True)}
    links = session.execute(
        select(MessageMedia.message_id, MessageMedia.media_id).where(MessageMedia.message_id.in_(copy_of))
    )
    rows = [{"message_id": copy_of[message_id], "media_id": media_id} for message_id, media_id in links]
    if rows:
        session.execute(insert(MessageMedia), rows)


def _delete_orphan_media(session: Session, among: set[int] | None) -> list[str]:
    """Delete media rows no message links to (only ids in `among` when given); return their relative paths."""
    query = select(Media.id, Media.relative_path).where(~exists().where(MessageMedia.media_id == Media.id))
    if among is not None:
        if not among:
            return []
        query = query.where(Media.id.in_(among))
    orphans = session.execute(query).all()
    for start in range(0, len(orphans), _CHUNK):
        chunk = [media_id for media_id, _ in orphans[start : start + _CHUNK]]
        session.execute(delete(Media).where(Media.id.in_(chunk)))
    return [path for _, path in orphans]


def _rowcount(session: Session, statement: Delete | Update) -> int:
    result = session.execute(statement, execution_options={"synchronize_session": False})
    return cast(CursorResult[Any], result).rowcount
