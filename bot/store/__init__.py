"""The conversation store: SQLAlchemy models, Alembic schema, an async repository of plain data."""

from bot.store.conversation_store import ConversationStore
from bot.store.database import upgrade
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

__all__ = [
    "ConversationStats",
    "ConversationStore",
    "FinalStatus",
    "ForgetResult",
    "NewQuestion",
    "NewTurn",
    "PurgeResult",
    "QuestionKind",
    "RecordedTurn",
    "UnfinishedQuestion",
    "upgrade",
]
