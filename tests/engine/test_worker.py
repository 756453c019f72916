"""The inference worker with the real tiny model: batching, ordering, streaming, failures, shutdown.

Slow requests and device faults are injected at the pipeline boundary (`Pipeline.run_batch` is wrapped; the
wrapped call still runs the real model), so every test is deterministic without sleeping on timing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch

from bot.engine import EngineRequest, GenerationResult, generate
from bot.engine.loader import load_model
from bot.engine.pipeline import Pipeline, PipelineOutput, PipelineRequest
from bot.engine.worker import InferenceEngine
from bot.errors import EngineStopped, GenerationFailed, ModelLoadError, OutOfMemory, QueueFull
from bot.settings import EngineSettings, GenerationSettings, ModelSettings, Settings

# Batching tests set max_batch_size to the number of requests they submit at once: the worker then starts
# as soon as all are queued, and this wait only guards against a slow test machine.
PATIENT_MS = 500
GREEDY = {"max_new_tokens": 8, "do_sample": False}
QUESTIONS = [f"Question {n}: what colour is item {n * 7}?" for n in range(8)]


def make_settings(model_dir: Path, **engine: object) -> Settings:
    return Settings(
        model=ModelSettings(
            name_or_path=str(model_dir), device_map="cpu", dtype="float32", local_files_only=True
        ),
        generation=GenerationSettings(max_new_tokens=8, do_sample=False),
        engine=EngineSettings(**engine),
    )


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def question_of(messages: list[dict]) -> str:
    return next(part["text"] for part in messages[-1]["content"] if part["type"] == "text")


@pytest.fixture(scope="module")
def direct_pipeline(tiny_model_dir: Path) -> Pipeline:
    """The pipeline on its own model copy, used from the test thread only."""
    settings = make_settings(tiny_model_dir)
    loaded = load_model(settings.model)
    return Pipeline(
        loaded.model,
        loaded.processor,
        min_pixels=settings.vision.min_pixels,
        max_pixels=settings.vision.max_pixels,
    )


@pytest.fixture(scope="module")
def reference(direct_pipeline: Pipeline) -> Callable[[str], PipelineOutput]:
    """The pipeline run directly, one question at a time: what every engine answer must equal."""
    answers: dict[str, PipelineOutput] = {}

    def answer(question: str) -> PipelineOutput:
        if question not in answers:
            answers[question] = direct_pipeline.run_batch([PipelineRequest(ask(question), dict(GREEDY))])[0]
        return answers[question]

    return answer


class StepGate:
    """Holds one pipeline call at its first decode step until released."""

    def __init__(self, call: int) -> None:
        self.call = call  # 1 for the first call
        self.reached = threading.Event()
        self.released = threading.Event()

    def wrap(self, check: Callable[[], bool] | None) -> Callable[[], bool]:
        def held() -> bool:
            if not self.reached.is_set():
                self.reached.set()
                assert self.released.wait(timeout=30)
            return check is not None and check()

        return held

    async def wait_reached(self) -> None:
        assert await asyncio.to_thread(self.reached.wait, 30)


class PipelineSpy:
    """Wraps `Pipeline.run_batch`: records each call's questions, pixel scale and answers so far, can hold it
    at a gate (a slow request) or at its first decode step (a batch running), and can raise a fault before
    the real call (the device failing)."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], float]] = []
        self.resumed: list[list[int]] = []  # per call, each request's tokens already generated
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fault: Callable[[list[str], float], BaseException | None] = lambda questions, scale: None
        self.step_gate: StepGate | None = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = Pipeline.run_batch

        def run_batch(
            pipeline: Pipeline,
            requests: list[PipelineRequest],
            *,
            pixel_scale: float = 1.0,
            pause: Callable[[], bool] | None = None,
        ):
            questions = [question_of(request.messages) for request in requests]
            self.calls.append((questions, pixel_scale))
            self.resumed.append([len(request.resume.ids) if request.resume else 0 for request in requests])
            self.entered.set()
            assert self.gate.wait(timeout=30)
            fault = self.fault(questions, pixel_scale)
            if fault is not None:
                raise fault
            step_gate = self.step_gate
            if step_gate is not None and step_gate.call == len(self.calls):
                first, *rest = requests
                requests = [dataclasses.replace(first, should_stop=step_gate.wrap(first.should_stop)), *rest]
            return original(pipeline, requests, pixel_scale=pixel_scale, pause=pause)

        monkeypatch.setattr(Pipeline, "run_batch", run_batch)

    def hold(self) -> None:
        self.gate.clear()
        self.entered.clear()

    def hold_at_step(self, call: int) -> StepGate:
        """Hold the `call`-th call (1 for the first) at its first decode step."""
        self.step_gate = StepGate(call)
        return self.step_gate

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 30)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> PipelineSpy:
    spy = PipelineSpy()
    spy.install(monkeypatch)
    return spy


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[InferenceEngine]:
    engine = InferenceEngine(settings)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop(grace=30)


def request(question: str, key: str | None = None, **kwargs: object) -> EngineRequest:
    return EngineRequest(messages=ask(question), conversation_key=key or question, **kwargs)


def assert_same(result: GenerationResult, expected: PipelineOutput) -> None:
    assert (result.text, result.token_ids, result.prompt_tokens) == (
        expected.text,
        expected.token_ids,
        expected.prompt_tokens,
    )


async def test_answer_equals_the_pipeline_run_directly(tiny_model_dir: Path, reference) -> None:
    async with running(make_settings(tiny_model_dir)) as engine:
        result = await generate(engine, ask(QUESTIONS[0]), conversation_key="c0")

    assert_same(result, reference(QUESTIONS[0]))
    assert result.token_ids, "the tiny model answers with at least one token"
    assert result.generate_seconds > 0


async def test_token_counts_on_the_loop_match_the_pipeline_while_the_worker_runs(
    tiny_model_dir: Path, direct_pipeline: Pipeline
) -> None:
    texts = [f"{question} Plus some more words, numbers 12345 and ünïcödé." for question in QUESTIONS]
    async with running(make_settings(tiny_model_dir, max_batch_size=1, batch_wait_ms=0)) as engine:
        handles = [engine.submit(request(text)) for text in texts]
        rounds = []
        while not all(handle.done() for handle in handles):
            rounds.append([engine.count_text_tokens(text) for text in texts])
            await asyncio.sleep(0)
        await asyncio.gather(*(handle.result() for handle in handles))

    expected = [direct_pipeline.count_text_tokens(text) for text in texts]
    assert len(rounds) > 1
    assert all(counts == expected for counts in rounds)


async def test_eight_conversations_share_one_batch_with_unchanged_answers(
    tiny_model_dir: Path, reference, spy: PipelineSpy
) -> None:
    settings = make_settings(tiny_model_dir, max_batch_size=8, batch_wait_ms=PATIENT_MS)
    async with running(settings) as engine:
        handles = [engine.submit(request(question)) for question in QUESTIONS]
        results = await asyncio.gather(*(handle.result() for handle in handles))
        stats = engine.stats

    assert spy.calls == [(QUESTIONS, 1.0)]
    assert stats.batch_sizes == {8: 1} and stats.completed == 8
    for question, result in zip(QUESTIONS, results, strict=True):
        assert_same(result, reference(question))


async def test_a_conversation_never_overtakes_itself(tiny_model_dir: Path, spy: PipelineSpy) -> None:
    settings = make_settings(tiny_model_dir, max_batch_size=5, batch_wait_ms=PATIENT_MS)
    async with running(settings) as engine:
        order: list[str] = []

        async def answer(question: str, key: str) -> None:
            await engine.submit(request(question, key)).result()
            order.append(question)

        questions = [("a1", "A"), ("a2", "A"), ("b1", "B"), ("a3", "A"), ("b2", "B")]
        await asyncio.gather(*(answer(question, key) for question, key in questions))

    assert [questions for questions, _ in spy.calls] == [["a1", "b1"], ["a2", "b2"], ["a3"]]
    assert order.index("a1") < order.index("a2") < order.index("a3")
    assert order.index("b1") < order.index("b2")


async def test_only_equal_generate_kwargs_batch_and_the_oldest_goes_first(
    tiny_model_dir: Path, spy: PipelineSpy
) -> None:
    longer = {**GREEDY, "max_new_tokens": 4}
    settings = make_settings(tiny_model_dir, max_batch_size=4, batch_wait_ms=PATIENT_MS)
    async with running(settings) as engine:
        handles = [
            engine.submit(request("p", generate_kwargs=dict(GREEDY))),
            engine.submit(request("q", generate_kwargs=longer)),
            engine.submit(request("r", generate_kwargs=dict(GREEDY))),
            engine.submit(request("s", generate_kwargs=longer)),
        ]
        results = await asyncio.gather(*(handle.result() for handle in handles))

    assert [questions for questions, _ in spy.calls] == [["p", "r"], ["q", "s"]]
    assert len(results[1].token_ids) <= 4


async def test_queue_full_is_raised_at_once_and_memory_stays_bounded(
    tiny_model_dir: Path, spy: PipelineSpy
) -> None:
    settings = make_settings(tiny_model_dir, max_queue_size=2, max_batch_size=1, batch_wait_ms=0)
    async with running(settings) as engine:
        spy.hold()
        slow = engine.submit(request("slow"))
        await spy.wait_entered()
        queued = [engine.submit(request(f"q{n}")) for n in range(2)]
        with pytest.raises(QueueFull):
            engine.submit(request("one too many"))
        assert engine.stats.queued == 2
        await asyncio.sleep(0.3)  # the queued requests wait at least this long behind the held one
        spy.gate.set()
        _first, *behind = await asyncio.gather(slow.result(), *(handle.result() for handle in queued))
        after = await generate(engine, ask("room again"), conversation_key="later")

    assert after.token_ids
    assert all(result.queue_seconds >= 0.3 for result in behind), "queue time counts the wait"


async def test_queue_positions_count_down_to_zero_on_the_loop_thread(
    tiny_model_dir: Path, spy: PipelineSpy
) -> None:
    loop_thread = threading.get_ident()
    settings = make_settings(tiny_model_dir, max_batch_size=1, batch_wait_ms=0)
    async with running(settings) as engine:
        spy.hold()
        seen: dict[int, list[int]] = {n: [] for n in range(4)}
        threads: set[int] = set()

        def recorder(n: int) -> Callable[[int], None]:
            def record(ahead: int) -> None:
                seen[n].append(ahead)
                threads.add(threading.get_ident())

            return record

        handles = [engine.submit(request(f"q{n}", on_queue_position=recorder(n))) for n in range(4)]
        assert [handle.ahead for handle in handles] == [0, 1, 2, 3]
        await spy.wait_entered()
        spy.gate.set()
        await asyncio.gather(*(handle.result() for handle in handles))

    assert seen == {0: [0], 1: [1, 0], 2: [2, 1, 0], 3: [3, 2, 1, 0]}
    assert threads == {loop_thread}


async def test_streamed_deltas_add_up_to_the_answer_on_the_loop_thread(tiny_model_dir: Path) -> None:
    loop_thread = threading.get_ident()
    deltas: list[str] = []
    threads: set[int] = set()

    def on_text(delta: str) -> None:
        deltas.append(delta)
        threads.add(threading.get_ident())

    async with running(make_settings(tiny_model_dir)) as engine:
        result = await generate(engine, ask(QUESTIONS[1]), conversation_key="s", on_text=on_text)

    assert "".join(deltas) == result.text
    assert len(deltas) >= 2
    assert threads == {loop_thread}


async def test_a_retry_after_a_mid_stream_failure_streams_no_text_twice(
    tiny_model_dir: Path, reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Pipeline.run_batch
    scales: list[float] = []

    def run_batch(
        pipeline: Pipeline,
        requests: list[PipelineRequest],
        *,
        pixel_scale: float = 1.0,
        pause: Callable[[], bool] | None = None,
    ):
        scales.append(pixel_scale)
        if len(scales) == 1:  # the device fails after the second piece of text was streamed
            forward = requests[0].on_text
            assert forward is not None
            pieces = 0

            def failing(delta: str) -> None:
                nonlocal pieces
                forward(delta)
                pieces += 1
                if pieces == 2:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory")

            requests = [dataclasses.replace(requests[0], on_text=failing)]
        return original(pipeline, requests, pixel_scale=pixel_scale, pause=pause)

    monkeypatch.setattr(Pipeline, "run_batch", run_batch)
    deltas: list[str] = []
    async with running(make_settings(tiny_model_dir)) as engine:
        result = await generate(engine, ask(QUESTIONS[5]), conversation_key="s", on_text=deltas.append)

    assert scales == [1.0, 0.5]
    assert "".join(deltas) == result.text
    assert_same(result, reference(QUESTIONS[5]))


async def test_a_failing_request_fails_alone_and_the_worker_keeps_serving(
    tiny_model_dir: Path, reference, spy: PipelineSpy
) -> None:
    broken = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(tiny_model_dir / "missing.png")},
                {"type": "text", "text": "broken"},
            ],
        }
    ]
    settings = make_settings(tiny_model_dir, max_batch_size=3, batch_wait_ms=PATIENT_MS)
    async with running(settings) as engine:
        good = [engine.submit(request(question)) for question in QUESTIONS[:2]]
        bad = engine.submit(EngineRequest(messages=broken, conversation_key="broken"))
        results = await asyncio.gather(*(handle.result() for handle in good))
        with pytest.raises(GenerationFailed) as failure:
            await bad.result()
        later = await generate(engine, ask(QUESTIONS[2]), conversation_key="later")
        stats = engine.stats

    assert failure.value.__cause__ is not None
    assert [questions for questions, _ in spy.calls] == [
        [QUESTIONS[0], QUESTIONS[1], "broken"],
        [QUESTIONS[0]],
        [QUESTIONS[1]],
        ["broken"],
        [QUESTIONS[2]],
    ]
    for question, result in zip(QUESTIONS, [*results, later], strict=False):
        assert_same(result, reference(question))
    assert (stats.completed, stats.failed) == (3, 1)


async def test_a_failed_request_logs_its_cause_with_the_traceback(
    tiny_model_dir: Path, spy: PipelineSpy, caplog: pytest.LogCaptureFixture
) -> None:
    spy.fault = lambda questions, scale: (
        ValueError("processor refused the prompt") if "bad" in questions else None
    )
    async with running(make_settings(tiny_model_dir)) as engine:
        with caplog.at_level(logging.WARNING, logger="bot.engine"), pytest.raises(GenerationFailed):
            await generate(engine, ask("bad"), conversation_key="bad")

    [record] = [record for record in caplog.records if record.getMessage().startswith("a request failed")]
    assert "processor refused the prompt" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ValueError


async def test_out_of_memory_retries_each_request_alone_with_fewer_pixels(
    tiny_model_dir: Path, reference, spy: PipelineSpy
) -> None:
    def first_call_runs_out(questions: list[str], scale: float) -> BaseException | None:
        return torch.cuda.OutOfMemoryError("CUDA out of memory") if len(spy.calls) == 1 else None

    spy.fault = first_call_runs_out
    settings = make_settings(tiny_model_dir, max_batch_size=2, batch_wait_ms=PATIENT_MS)
    async with running(settings) as engine:
        handles = [engine.submit(request(question)) for question in QUESTIONS[:2]]
        results = await asyncio.gather(*(handle.result() for handle in handles))
        stats = engine.stats

    assert spy.calls == [(QUESTIONS[:2], 1.0), ([QUESTIONS[0]], 0.5), ([QUESTIONS[1]], 0.5)]
    for question, result in zip(QUESTIONS, results, strict=False):
        assert_same(result, reference(question))
    assert stats.oom_retries == 2


async def test_persistent_out_of_memory_fails_only_that_request(
    tiny_model_dir: Path, reference, spy: PipelineSpy
) -> None:
    def huge_never_fits(questions: list[str], scale: float) -> BaseException | None:
        return RuntimeError("CUDA error: out of memory") if "huge" in questions else None

    spy.fault = huge_never_fits
    settings = make_settings(tiny_model_dir, max_batch_size=2, batch_wait_ms=PATIENT_MS)
    async with running(settings) as engine:
        huge = engine.submit(request("huge"))
        fine = engine.submit(request(QUESTIONS[3]))
        with pytest.raises(OutOfMemory) as failure:
            await huge.result()
        result = await fine.result()
        again = await generate(engine, ask(QUESTIONS[4]), conversation_key="after")

    assert isinstance(failure.value.__cause__, RuntimeError)
    assert spy.calls[:3] == [(["huge", QUESTIONS[3]], 1.0), (["huge"], 0.5), ([QUESTIONS[3]], 0.5)]
    assert_same(result, reference(QUESTIONS[3]))
    assert_same(again, reference(QUESTIONS[4]))


async def test_cancelled_requests_leave_the_queue_or_have_their_result_dropped(
    tiny_model_dir: Path, spy: PipelineSpy
) -> None:
    settings = make_settings(tiny_model_dir, max_batch_size=1, batch_wait_ms=0)
    async with running(settings) as engine:
        spy.hold()
        running_one = engine.submit(request("running"))
        await spy.wait_entered()
        queued = engine.submit(request("queued"))
        last = engine.submit(request("last"))
        assert last.ahead == 2
        assert queued.cancel() and running_one.cancel()
        await asyncio.sleep(0)
        assert last.ahead == 1 and engine.stats.queued == 1
        spy.gate.set()
        result = await last.result()
        with pytest.raises(asyncio.CancelledError):
            await queued.result()
        stats = engine.stats

    assert result.token_ids
    assert [questions for questions, _ in spy.calls] == [["running"], ["last"]]
    assert (stats.cancelled, stats.aborted, stats.completed) == (2, 1, 1)


async def test_request_timeout_fails_the_request(tiny_model_dir: Path, spy: PipelineSpy) -> None:
    settings = make_settings(tiny_model_dir, max_batch_size=1, batch_wait_ms=0, request_timeout_seconds=0.2)
    async with running(settings) as engine:
        spy.hold()
        slow = engine.submit(request("slow"))
        with pytest.raises(GenerationFailed, match="timed out"):
            await slow.result()
        spy.gate.set()
        after = await generate(engine, ask("after"), conversation_key="after")

    assert after.token_ids


async def test_stop_finishes_the_running_batch_and_fails_the_queue(
    tiny_model_dir: Path, spy: PipelineSpy
) -> None:
    settings = make_settings(tiny_model_dir, max_batch_size=1, batch_wait_ms=0)
    engine = InferenceEngine(settings)
    await engine.start()
    spy.hold()
    in_flight = engine.submit(request("in flight"))
    await spy.wait_entered()
    queued = [engine.submit(request(f"queued {n}")) for n in range(3)]

    stopping = asyncio.create_task(engine.stop(grace=30))
    for handle in queued:
        with pytest.raises(EngineStopped):
            await handle.result()
    with pytest.raises(EngineStopped):
        engine.submit(request("too late"))
    spy.gate.set()
    result = await in_flight.result()
    await stopping
    await engine.stop()  # idempotent

    assert result.token_ids
    assert not engine.worker_alive
    assert [questions for questions, _ in spy.calls] == [["in flight"]]


async def test_stop_after_the_grace_period_aborts_the_running_batch(
    tiny_model_dir: Path, spy: PipelineSpy
) -> None:
    engine = InferenceEngine(make_settings(tiny_model_dir))
    await engine.start()
    spy.hold()
    in_flight = engine.submit(request("never finishes in time"))
    await spy.wait_entered()
    stopping = asyncio.create_task(engine.stop(grace=0.1))
    with pytest.raises(EngineStopped):
        await in_flight.result()
    spy.gate.set()
    await stopping

    assert not engine.worker_alive
    assert engine.stats.aborted == 1


async def test_ready_from_the_model_loaded_until_the_worker_stops(tiny_model_dir: Path) -> None:
    engine = InferenceEngine(make_settings(tiny_model_dir))
    assert await engine.readiness() == "not started"
    starting = asyncio.create_task(engine.start())
    await asyncio.sleep(0)  # the worker thread starts and loads the model
    assert await engine.readiness() == "the model is loading"
    await starting
    assert await engine.readiness() is None
    await engine.stop()
    assert await engine.readiness() == "stopped"


async def test_start_with_a_bad_path_raises_model_load_error(tmp_path: Path) -> None:
    engine = InferenceEngine(make_settings(tmp_path / "no-such-model"))
    with pytest.raises(ModelLoadError):
        await engine.start()
    assert await engine.readiness() == "stopped"
    with pytest.raises(EngineStopped):
        engine.submit(request("anything"))
    await engine.stop()


async def test_batches_stay_within_the_token_budget(tiny_model_dir: Path, spy: PipelineSpy) -> None:
    # Each request costs 300 // 3 + 8 prompt tokens + 8 new ones = 116: two fit in 256, three do not.
    questions = [f"{n}" + "x" * 299 for n in range(4)]
    settings = make_settings(tiny_model_dir, max_batch_size=4, max_batch_tokens=256, batch_wait_ms=PATIENT_MS)
    async with running(settings) as engine:
        handles = [engine.submit(request(question)) for question in questions]
        await asyncio.gather(*(handle.result() for handle in handles))

    assert [calls for calls, _ in spy.calls] == [questions[:2], questions[2:]]


async def test_stop_ends_only_that_row_at_the_next_step_and_keeps_its_text(
    tiny_model_dir: Path, direct_pipeline: Pipeline, spy: PipelineSpy
) -> None:
    long_answers = {"max_new_tokens": 40, "do_sample": False}
    questions = QUESTIONS[:3]
    expected = direct_pipeline.run_batch([PipelineRequest(ask(q), dict(long_answers)) for q in questions])
    settings = make_settings(tiny_model_dir, max_batch_size=3, batch_wait_ms=PATIENT_MS)
    async with running(settings) as engine:
        spy.hold()
        handles = [engine.submit(request(q, generate_kwargs=long_answers)) for q in questions]
        await spy.wait_entered()
        handles[1].stop()  # pressed while the batch is about to run: its row ends after one token
        spy.gate.set()
        first, stopped, third = await asyncio.gather(*(handle.result() for handle in handles))

    engine_calls = spy.calls[1:]  # the first is the direct reference run above
    assert engine_calls == [(questions, 1.0)], "one batch, never re-run"
    assert stopped.stopped and stopped.token_ids == expected[1].token_ids[:1]
    assert expected[1].text.startswith(stopped.text)
    for result, reference_output in ((first, expected[0]), (third, expected[2])):
        assert not result.stopped
        assert (result.text, result.token_ids) == (reference_output.text, reference_output.token_ids)


async def test_stop_of_a_queued_request_ends_it_at_once_with_no_text(
    tiny_model_dir: Path, spy: PipelineSpy
) -> None:
    settings = make_settings(tiny_model_dir, max_batch_size=1, batch_wait_ms=0)
    async with running(settings) as engine:
        spy.hold()
        running_one = engine.submit(request("running"))
        await spy.wait_entered()
        queued = engine.submit(request("queued"))
        last = engine.submit(request("last"))
        queued.stop()
        result = await queued.result()
        assert (result.stopped, result.text, result.token_ids) == (True, "", [])
        await asyncio.sleep(0)
        assert last.ahead == 1 and engine.stats.queued == 1
        spy.gate.set()
        await asyncio.gather(running_one.result(), last.result())
        queued.stop()  # a finished request: nothing happens

    assert [questions for questions, _ in spy.calls] == [["running"], ["last"]]


LONG = {"max_new_tokens": 40, "do_sample": False}
JOIN_STEPS = 4


@pytest.fixture(scope="module")
def long_reference(direct_pipeline: Pipeline) -> Callable[[str], PipelineOutput]:
    """Long greedy answers of the pipeline run directly, one question at a time."""
    answers: dict[str, PipelineOutput] = {}

    def answer(question: str) -> PipelineOutput:
        if question not in answers:
            answers[question] = direct_pipeline.run_batch([PipelineRequest(ask(question), dict(LONG))])[0]
            assert len(answers[question].token_ids) > JOIN_STEPS + 1, "long enough to be joined"
        return answers[question]

    return answer


def joining_settings(model_dir: Path) -> Settings:
    return make_settings(model_dir, max_batch_size=4, batch_wait_ms=0, join_interval_steps=JOIN_STEPS)


async def test_a_request_arriving_mid_batch_joins_it_within_the_step_bound(
    tiny_model_dir: Path, long_reference, spy: PipelineSpy
) -> None:
    events: list[str] = []
    async with running(joining_settings(tiny_model_dir)) as engine:
        step = spy.hold_at_step(call=1)
        first = engine.submit(request(QUESTIONS[0], generate_kwargs=LONG))
        await step.wait_reached()  # the first batch is running: one token generated
        late = engine.submit(
            request(QUESTIONS[1], generate_kwargs=LONG, on_text=lambda delta: events.append("late text"))
        )
        step.released.set()
        first_result = await first.result()
        events.append("first done")
        late_result = await late.result()

    assert spy.calls == [([QUESTIONS[0]], 1.0), ([QUESTIONS[0], QUESTIONS[1]], 1.0)]
    assert spy.resumed == [[0], [JOIN_STEPS, 0]], "joined after exactly the bound"
    assert events.index("late text") < events.index("first done")
    assert_same(first_result, long_reference(QUESTIONS[0]))
    assert_same(late_result, long_reference(QUESTIONS[1]))
    assert late_result.queue_seconds < first_result.generate_seconds


@pytest.mark.parametrize(
    ("fault", "error", "retry_scale"),
    [
        (ValueError("the processor refused the newcomer"), GenerationFailed, 1.0),
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), OutOfMemory, 0.5),
    ],
)
async def test_a_request_failing_in_a_joined_batch_fails_alone(
    tiny_model_dir: Path,
    long_reference,
    spy: PipelineSpy,
    fault: BaseException,
    error: type[Exception],
    retry_scale: float,
) -> None:
    spy.fault = lambda questions, scale: fault if "bad" in questions else None
    deltas: list[str] = []
    async with running(joining_settings(tiny_model_dir)) as engine:
        step = spy.hold_at_step(call=1)
        first = engine.submit(request(QUESTIONS[2], generate_kwargs=LONG, on_text=deltas.append))
        await step.wait_reached()
        bad = engine.submit(request("bad", generate_kwargs=LONG))
        step.released.set()
        with pytest.raises(error):
            await bad.result()
        result = await first.result()
        stats = engine.stats

    assert spy.calls == [
        ([QUESTIONS[2]], 1.0),
        ([QUESTIONS[2], "bad"], 1.0),
        ([QUESTIONS[2]], retry_scale),  # from the start of its answer
        (["bad"], retry_scale),
    ]
    assert_same(result, long_reference(QUESTIONS[2]))
    assert "".join(deltas) == result.text, "no text streamed twice"
    assert (stats.completed, stats.failed) == (1, 1)


async def test_stop_on_one_row_of_a_joined_batch_ends_only_that_row(
    tiny_model_dir: Path, long_reference, spy: PipelineSpy
) -> None:
    async with running(joining_settings(tiny_model_dir)) as engine:
        alone = spy.hold_at_step(call=1)
        first = engine.submit(request(QUESTIONS[3], generate_kwargs=LONG))
        await alone.wait_reached()
        joined = spy.hold_at_step(call=2)
        late = engine.submit(request(QUESTIONS[4], generate_kwargs=LONG))
        alone.released.set()
        await joined.wait_reached()  # the joined batch made its first step
        first.stop()
        joined.released.set()
        stopped, finished = await asyncio.gather(first.result(), late.result())

    assert spy.calls == [([QUESTIONS[3]], 1.0), ([QUESTIONS[3], QUESTIONS[4]], 1.0)]
    expected = long_reference(QUESTIONS[3])
    assert stopped.stopped and stopped.token_ids == expected.token_ids[: JOIN_STEPS + 1]
    assert expected.text.startswith(stopped.text)
    assert not finished.stopped
    assert_same(finished, long_reference(QUESTIONS[4]))
