"""The scheduling rules on their own: no model, no threads, no loop work beyond plain futures."""

from __future__ import annotations

import asyncio

import pytest

from bot.engine.api import EngineRequest
from bot.engine.scheduler import ScheduledRequest, Scheduler, form_batch
from bot.errors import QueueFull

GREEDY: dict[str, object] = {"max_new_tokens": 8, "do_sample": False}
SAMPLED: dict[str, object] = {"max_new_tokens": 8, "do_sample": True}


@pytest.fixture
def make() -> object:
    loop = asyncio.new_event_loop()
    counter = iter(range(1000))

    def make_request(
        conversation: str, *, kwargs: dict[str, object] = GREEDY, cost: int = 10
    ) -> ScheduledRequest:
        request = EngineRequest(messages=[], conversation_key=conversation, generate_kwargs=kwargs)
        return ScheduledRequest(next(counter), request, kwargs, cost, loop.create_future(), 0.0)

    yield make_request
    loop.close()


def conversations(batch: list[ScheduledRequest]) -> list[str]:
    return [item.conversation_key for item in batch]


def test_oldest_leads_and_a_conversation_never_has_two_in_a_batch(make) -> None:
    queue = [make("a"), make("b"), make("a"), make("c")]

    assert conversations(form_batch(queue, max_size=8)) == ["a", "b", "c"]
    assert conversations(form_batch(queue, max_size=2)) == ["a", "b"]


def test_only_requests_with_the_head_kwargs_join_unless_kwargs_do_not_matter(make) -> None:
    queue = [make("a"), make("b", kwargs=SAMPLED), make("c"), make("d", kwargs=SAMPLED)]

    assert conversations(form_batch(queue, max_size=8)) == ["a", "c"]
    assert conversations(form_batch(queue, max_size=8, same_kwargs=False)) == ["a", "b", "c", "d"]


def test_a_later_question_never_overtakes_an_earlier_one_of_its_conversation(make) -> None:
    # b's second question has other kwargs than the head; it must not run before b's first either.
    queue = [make("a"), make("b", kwargs=SAMPLED), make("b")]

    assert conversations(form_batch(queue, max_size=8)) == ["a"]


def test_token_budget_counts_padding_to_the_widest_row_but_the_head_always_runs(make) -> None:
    queue = [make("a", cost=100), make("b", cost=10), make("c", cost=300), make("d", cost=100)]

    # 3 rows x 100 fit in 300; c would make it 3 x 300.
    assert conversations(form_batch(queue, max_size=8, max_tokens=300)) == ["a", "b", "d"]
    assert conversations(form_batch([make("huge", cost=10_000)], max_size=8, max_tokens=300)) == ["huge"]


def test_busy_conversations_wait_and_the_next_oldest_leads(make) -> None:
    queue = [make("a"), make("b"), make("c")]

    assert conversations(form_batch(queue, max_size=1, busy=frozenset({"a"}))) == ["b"]
    assert form_batch(queue, max_size=8, busy=frozenset({"a", "b", "c"})) == []


def test_scheduler_limits_the_queue_and_moves_requests_through(make) -> None:
    scheduler = Scheduler(max_queue_size=2)
    first, second = make("a"), make("b")
    scheduler.enqueue(first)
    scheduler.enqueue(second)
    with pytest.raises(QueueFull):
        scheduler.enqueue(make("c"))

    batch = scheduler.next_batch(max_size=1)
    assert batch == [first] and scheduler.waiting == [first, second], "deciding starts nothing"
    scheduler.start(batch, now=5.0)
    assert (scheduler.waiting, scheduler.running, first.started_at) == ([second], [first], 5.0)
    scheduler.enqueue(make("a"))
    assert conversations(scheduler.next_batch(max_size=8)) == ["b"], "a is running: its next one waits"
    assert scheduler.next_batch(max_size=0) == []
    scheduler.finish(batch)
    assert conversations(scheduler.next_batch(max_size=8)) == ["b", "a"]


def test_positions_count_earlier_requests_and_only_go_down(make) -> None:
    scheduler = Scheduler(max_queue_size=8)
    items = [make(name) for name in "abcd"]
    for item in items:
        scheduler.enqueue(item)

    assert [(item.conversation_key, ahead) for item, ahead in scheduler.positions()] == [
        ("a", 0),
        ("b", 1),
        ("c", 2),
        ("d", 3),
    ]
    assert scheduler.positions() == [], "unchanged positions are not published again"

    scheduler.start(scheduler.next_batch(max_size=2), now=0.0)  # a and b run
    assert [(item.conversation_key, ahead) for item, ahead in scheduler.positions()] == [("b", 0)]
    assert scheduler.withdraw(items[2]) and not scheduler.withdraw(items[0])
    assert [(item.conversation_key, ahead) for item, ahead in scheduler.positions()] == [("d", 2)]
    scheduler.finish(items[:2])
    assert [(item.conversation_key, ahead) for item, ahead in scheduler.positions()] == [("d", 0)]
    assert scheduler.take_waiting() == [items[3]] and scheduler.waiting == []


def test_requests_join_the_running_batch_under_the_same_rules(make) -> None:
    scheduler = Scheduler(max_queue_size=8)
    running = [make("a", cost=100), make("b", cost=100)]
    for item in running:
        scheduler.enqueue(item)
    scheduler.start(scheduler.next_batch(max_size=4), now=0.0)
    for item in [make("a"), make("c", kwargs=SAMPLED), make("d", cost=100), make("e", cost=200), make("f")]:
        scheduler.enqueue(item)

    # a is running; c's options differ; e would make it 4 x 200 > 500; the batch holds 4 with d and f.
    assert conversations(scheduler.next_batch(max_size=4, max_tokens=500, join=True)) == ["d", "f"]
    assert conversations(scheduler.next_batch(max_size=3, join=True)) == ["d"]
    assert scheduler.next_batch(max_size=2, join=True) == []
