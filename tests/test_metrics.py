"""The engine's figures as metrics: read from its own `EngineStats` at each scrape."""

from __future__ import annotations

from bot.engine import EngineStats
from bot.metrics import Metrics


def stats(batch_sizes: dict[int, int], *, queued: int = 0, running: int = 0) -> EngineStats:
    return EngineStats(
        batches=sum(batch_sizes.values()),
        batch_sizes=batch_sizes,
        completed=0,
        failed=0,
        cancelled=0,
        aborted=0,
        oom_retries=0,
        queued=queued,
        running=running,
    )


def test_queue_and_batch_sizes_come_from_the_engines_stats_at_each_scrape() -> None:
    metrics = Metrics()
    sample = metrics.registry.get_sample_value
    assert sample("qwenbot_queue_depth") == 0 and sample("qwenbot_batch_size_count") == 0, "no engine yet"
    current = stats({1: 2, 3: 1, 200: 1}, queued=5, running=3)
    metrics.watch_engine(lambda: current)
    assert sample("qwenbot_queue_depth") == 5
    assert sample("qwenbot_running_requests") == 3
    assert sample("qwenbot_batch_size_bucket", {"le": "1.0"}) == 2
    assert sample("qwenbot_batch_size_bucket", {"le": "2.0"}) == 2
    assert sample("qwenbot_batch_size_bucket", {"le": "4.0"}) == 3
    assert sample("qwenbot_batch_size_bucket", {"le": "128.0"}) == 3
    assert sample("qwenbot_batch_size_bucket", {"le": "+Inf"}) == 4
    assert sample("qwenbot_batch_size_count") == 4
    assert sample("qwenbot_batch_size_sum") == 2 + 3 + 200
    current = stats({1: 3})
    assert sample("qwenbot_queue_depth") == 0 and sample("qwenbot_batch_size_count") == 3
