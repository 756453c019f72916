"""The decode gate: decodes whose pixels together pass its capacity wait, in arrival order."""

from __future__ import annotations

import asyncio

import pytest

from bot.media.decode_gate import DecodeGate


class Decodes:
    """Decodes through one gate, each held open until the test lets it finish; records what ran at once."""

    def __init__(self, gate: DecodeGate) -> None:
        self.gate = gate
        self.started: list[str] = []
        self.finish: dict[str, asyncio.Event] = {}
        self.most_in_use = 0

    def start(self, name: str, pixels: int) -> asyncio.Task[bool]:
        self.finish[name] = asyncio.Event()
        return asyncio.create_task(self._decode(name, pixels))

    async def _decode(self, name: str, pixels: int) -> bool:
        async with self.gate.admit(pixels) as waited:
            self.started.append(name)
            self.most_in_use = max(self.most_in_use, self.gate.in_use)
            await self.finish[name].wait()
        return waited


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_big_decodes_run_one_after_another_in_arrival_order() -> None:
    decodes = Decodes(DecodeGate(100))
    tasks = [decodes.start(name, 60) for name in ("a", "b", "c")]
    await settle()
    assert decodes.started == ["a"]
    for name, expected in (("a", ["a", "b"]), ("b", ["a", "b", "c"]), ("c", ["a", "b", "c"])):
        decodes.finish[name].set()
        await settle()
        assert decodes.started == expected
    assert [await task for task in tasks] == [False, True, True]
    assert decodes.most_in_use == 60 and decodes.gate.in_use == 0


async def test_small_decodes_share_the_capacity_and_a_big_one_waits_its_turn() -> None:
    decodes = Decodes(DecodeGate(100))
    small = [decodes.start(f"s{i}", 30) for i in range(3)]
    big = decodes.start("big", 60)
    late_small = decodes.start("late", 5)  # fits, but arrived after the waiting big one: no overtaking
    await settle()
    assert decodes.started == ["s0", "s1", "s2"]
    decodes.finish["s0"].set()
    await settle()
    assert "big" not in decodes.started  # 60 + 60 still over 100
    decodes.finish["s1"].set()
    await settle()
    assert decodes.started[3:] == ["big", "late"]
    for event in decodes.finish.values():
        event.set()
    await asyncio.gather(*small, big, late_small)
    assert decodes.most_in_use <= 100 and decodes.gate.in_use == 0


async def test_a_decode_larger_than_the_capacity_runs_alone() -> None:
    decodes = Decodes(DecodeGate(100))
    huge = decodes.start("huge", 500)
    small = decodes.start("small", 1)
    await settle()
    assert decodes.started == ["huge"]
    decodes.finish["huge"].set()
    decodes.finish["small"].set()
    await asyncio.gather(huge, small)
    assert decodes.started == ["huge", "small"]


async def test_a_cancelled_waiter_gives_up_its_place() -> None:
    decodes = Decodes(DecodeGate(100))
    first = decodes.start("first", 80)
    big = decodes.start("big", 90)
    small = decodes.start("small", 20)
    await settle()
    big.cancel()
    with pytest.raises(asyncio.CancelledError):
        await big
    await settle()
    assert decodes.started == ["first", "small"]  # the cancelled big one no longer blocks the queue
    decodes.finish["first"].set()
    decodes.finish["small"].set()
    await asyncio.gather(first, small)
    assert decodes.gate.in_use == 0


def test_the_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        DecodeGate(0)
