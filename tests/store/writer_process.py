"""One bot process's store traffic, run as its own OS process by `test_two_processes.py`.

    python -m tests.store.writer_process DATABASE_URL MEDIA_DIR {forward,backward}

Opens its own ConversationStore, prints "ready" and waits for a line on stdin (so that both processes start
at once), then records every question of `QUESTIONS` in the given order and prints how many were duplicates.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from bot.store import ConversationStore
from bot.store.results import NewTurn
from tests.store.factories import question, scope, write_media

CONVERSATIONS = 4
TURNS = 12
# (channel id, question's Discord id), as both processes receive them.
QUESTIONS = [
    (channel, channel * 1000 + turn) for turn in range(TURNS) for channel in range(1, CONVERSATIONS + 1)
]


async def record_all(database_url: str, media_dir: Path, order: str) -> int:
    image = write_media(media_dir, seed=1)  # the same picture in both processes
    questions = QUESTIONS if order == "forward" else QUESTIONS[::-1]
    duplicates = 0
    async with ConversationStore(database_url, media_dir) as store:
        print("ready", flush=True)
        sys.stdin.readline()
        for channel, discord_id in questions:
            conversation = await store.conversation_for(scope(channel))
            media = (image,) if discord_id % 3 == 0 else ()
            turn = NewTurn(question(f"question {discord_id}", *media), f"answer {discord_id}", discord_id)
            duplicates += (await store.record_turn(conversation, turn)).duplicate
    return duplicates


if __name__ == "__main__":
    url, folder, direction = sys.argv[1:]
    print(asyncio.run(record_all(url, Path(folder), direction)))
