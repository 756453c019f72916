"""Inference backends behind one protocol (`bot.engine.api`); only `bot.engine.worker` and what it
loads import torch, and only when the in-process engine is chosen."""

from bot.engine.api import (
    Engine,
    EngineRequest,
    EngineStats,
    GenerationResult,
    QwenMessage,
    QwenPart,
    RequestHandle,
    generate,
)
from bot.settings import Settings


def create_engine(settings: Settings) -> Engine:
    """The backend `settings.engine.backend` names (not yet started); imports torch only for `local`."""
    if settings.engine.backend == "server":
        from bot.engine.server import ServerEngine

        return ServerEngine(settings)
    from bot.engine.worker import InferenceEngine

    return InferenceEngine(settings)


__all__ = [
    "Engine",
    "EngineRequest",
    "EngineStats",
    "GenerationResult",
    "QwenMessage",
    "QwenPart",
    "RequestHandle",
    "create_engine",
    "generate",
]
