"""The only package that imports torch: model loading, the batch pipeline and the inference worker."""

from bot.engine.worker import EngineRequest, EngineStats, GenerationResult, InferenceEngine, RequestHandle

__all__ = ["EngineRequest", "EngineStats", "GenerationResult", "InferenceEngine", "RequestHandle"]
