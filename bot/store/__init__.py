"""The conversation store: SQLAlchemy models, Alembic schema, an async repository of plain data."""

from bot.store.conversation_store import ConversationStore
from bot.store.database import upgrade
from bot.store.results import ConversationStats, ForgetResult, NewTurn, PurgeResult, RecordedTurn

__all__ = [
    "ConversationStats",
    "ConversationStore",
    "ForgetResult",
    "NewTurn",
    "PurgeResult",
    "RecordedTurn",
    "upgrade",
]
