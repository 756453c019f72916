"""Benchmark: loading the context window costs the same for a 10,000-turn and a 100-turn conversation.

Builds both conversations in a temporary SQLite database (bulk inserts: setup, not the thing measured), then
times `ConversationStore.load_window` through the store's async API, alternating the two conversations, and
prints both medians and their ratio (about 1 when the window load is O(window), not O(history)).

    python bench/bench_store_window.py [--large-turns 10000] [--small-turns 100] [--max-messages 40]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import insert
from tqdm import tqdm

from bot.content import ConversationScope
from bot.store import ConversationStore, upgrade
from bot.store.database import create_engine_for
from bot.store.models import Message

CHUNK_TURNS = 1000


def bulk_fill(database_url: str, conversation_id: int, turns: int, label: str) -> None:
    """Insert `turns` question/answer pairs in chunks, one transaction per chunk."""
    engine = create_engine_for(database_url)
    now = datetime.now(UTC)
    try:
        with tqdm(total=turns, desc=f"filling {label}", unit="turn") as progress:
            for start in range(0, turns, CHUNK_TURNS):
                rows = []
                for turn in range(start, min(start + CHUNK_TURNS, turns)):
                    for offset, role in enumerate(("user", "assistant")):
                        text = f"{'question' if role == 'user' else 'answer'} {turn}: " + "lorem ipsum " * 20
                        rows.append(
                            {
                                "conversation_id": conversation_id,
                                "position": 2 * turn + offset,
                                "role": role,
                                "content": [{"type": "text", "text": text}],
                                "discord_message_id": 10_000_000 * conversation_id + 2 * turn + offset,
                                "created_at": now,
                            }
                        )
                with engine.begin() as connection:
                    connection.execute(insert(Message), rows)
                progress.update(len(rows) // 2)
    finally:
        engine.dispose()


async def time_windows(
    store: ConversationStore, conversations: dict[str, int], max_messages: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per `load_window` call, alternating the conversations so drift hits both alike."""
    for conversation_id in conversations.values():  # warm-up: connections, page cache
        for _ in range(10):
            await store.load_window(conversation_id, max_messages)
    timings: dict[str, list[float]] = {label: [] for label in conversations}
    for _ in tqdm(range(repeats), desc="timing load_window", unit="round"):
        for label, conversation_id in conversations.items():
            started = time.perf_counter()
            window = await store.load_window(conversation_id, max_messages)
            timings[label].append(time.perf_counter() - started)
            assert len(window) == max_messages - max_messages % 2
    return timings


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-store-") as folder:
        database_url = f"sqlite:///{Path(folder, 'bench.sqlite3').as_posix()}"
        upgrade(database_url)
        sizes = {"large": args.large_turns, "small": args.small_turns}
        async with ConversationStore(database_url, Path(folder, "media")) as store:
            conversations = {
                label: await store.conversation_for(ConversationScope("cli", channel_id=index))
                for index, label in enumerate(sizes, start=1)
            }
            for label, turns in sizes.items():
                bulk_fill(database_url, conversations[label], turns, label)
            timings = await time_windows(store, conversations, args.max_messages, args.repeats)

    medians = {label: statistics.median(values) * 1e3 for label, values in timings.items()}
    p90s = {label: statistics.quantiles(values, n=10)[-1] * 1e3 for label, values in timings.items()}
    print()
    print(f"load_window(max_messages={args.max_messages}), {args.repeats} calls each, SQLite (WAL)")
    print(f"{'conversation':<14}{'turns':>8}{'messages':>10}{'median ms':>12}{'p90 ms':>10}")
    for label, turns in sizes.items():
        print(f"{label:<14}{turns:>8}{2 * turns:>10}{medians[label]:>12.3f}{p90s[label]:>10.3f}")
    print(f"median ratio large/small: {medians['large'] / medians['small']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--large-turns", type=int, default=10_000)
    parser.add_argument("--small-turns", type=int, default=100)
    parser.add_argument("--max-messages", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=300)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
