"""The server backend against a real `transformers serve` on the tiny model, on 127.0.0.1.

Faults the real server cannot be asked for (429, 503, a cut stream, a silence, refused connections) come
from a loopback proxy in front of it (`tests.inference.proxy`); everything else is the real server.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from PIL import Image

from bot.engine import EngineRequest, GenerationResult, RequestHandle, generate
from bot.engine.budget import smart_resize
from bot.engine.server import ServerEngine
from bot.engine.worker import InferenceEngine
from bot.errors import (
    AnswerIncomplete,
    ContextTooLong,
    EngineStopped,
    ModelLoadError,
    ServerRejected,
    ServerTimeout,
    ServerUnavailable,
    VideoNotSupported,
)
from bot.settings import Settings
from tests.inference.proxy import Fault, InferenceProxy
from tests.inference.server import InferenceServer, free_port
from tests.tiny_settings import tiny_settings

GREEDY = {"max_new_tokens": 12, "do_sample": False}
SYSTEM = {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]}


def server_settings(model_dir: Path, tmp_path: Path, base_url: str, model: str, **server: Any) -> Settings:
    return tiny_settings(
        model_dir,
        tmp_path,
        engine={"backend": "server"},
        server={"base_url": base_url, "model": model, "connect_timeout_seconds": 1.0, **server},
        generation={"max_new_tokens": 12},
    )


@pytest_asyncio.fixture
async def proxy(inference_server: InferenceServer) -> AsyncIterator[InferenceProxy]:
    proxy = InferenceProxy(inference_server)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.fixture
def connect(
    tiny_model_dir: Path, tmp_path: Path, inference_server: InferenceServer, proxy: InferenceProxy
) -> Callable[..., Any]:
    """`async with connect(**server_settings) as engine`: a started ServerEngine talking through the proxy."""

    @asynccontextmanager
    async def connected(**server: Any) -> AsyncIterator[ServerEngine]:
        settings = server_settings(tiny_model_dir, tmp_path, proxy.base_url, inference_server.model, **server)
        engine = ServerEngine(settings)
        await engine.start()
        try:
            yield engine
        finally:
            await engine.stop(grace=10)

    return connected


def picture(path: Path, size: tuple[int, int], seed: int) -> Path:
    """An image with structure (so resizing matters), deterministic per seed."""
    image = Image.effect_mandelbrot(size, (-2 + seed * 0.1, -1.2, 1, 1.2), 60).convert("RGB")
    image.save(path)
    return path


def user(text: str, *images: Path) -> dict:
    parts: list[dict] = [{"type": "image", "image": str(image)} for image in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def sent_images(body: dict) -> list[Image.Image]:
    """The images a chat-completion request carried, decoded from their data: URLs."""
    images = []
    for message in body["messages"]:
        for part in message["content"] if isinstance(message["content"], list) else ():
            if part["type"] == "image_url":
                url = part["image_url"]["url"]
                assert url.startswith("data:image/png;base64,"), "images travel inline, never as links"
                images.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    return images


async def test_greedy_answers_equal_the_in_process_engine(
    connect: Callable[..., Any], tiny_model_dir: Path, tmp_path: Path, inference_server: InferenceServer
) -> None:
    first = picture(tmp_path / "first.png", (150, 100), seed=0)
    second = picture(tmp_path / "second.png", (97, 131), seed=3)
    conversations = {
        "image": [SYSTEM, user("What is this?", first)],
        "follow-up": [
            SYSTEM,
            user("What is this?", first),
            assistant("A fractal."),
            user("And now?", second),
        ],
        "text": [SYSTEM, user("Hello there, who are you?")],
    }
    local = InferenceEngine(
        tiny_settings(
            tiny_model_dir, tmp_path, generation={"max_new_tokens": 12}, engine={"vision_cache_mb": 0}
        )
    )
    await local.start()
    try:
        expected = {
            name: await generate(local, messages, conversation_key=name, generate_kwargs=GREEDY)
            for name, messages in conversations.items()
        }
    finally:
        await local.stop()

    async with connect() as engine:
        for name, messages in conversations.items():
            streamed: list[str] = []
            result = await generate(
                engine, messages, conversation_key=name, generate_kwargs=GREEDY, on_text=streamed.append
            )
            # Cut at max_new_tokens in the middle of a multi-byte character, the local text ends in U+FFFD
            # (decoding incomplete bytes); the server's stream holds such a half character back. The tokens
            # are the same: the counts below agree.
            assert result.text == expected[name].text.removesuffix("\ufffd"), name
            assert "".join(streamed) == result.text
            assert result.completion_tokens == len(expected[name].token_ids), name


async def test_images_are_resized_like_the_local_engine_and_sent_inline(
    connect: Callable[..., Any], proxy: InferenceProxy, tmp_path: Path
) -> None:
    big = picture(tmp_path / "big.png", (1200, 900), seed=1)
    # transformers serve refuses fields outside OpenAI's (422): the pass-through is shown with one it takes.
    async with connect(extra_body={"seed": 7}) as engine:
        await generate(engine, [SYSTEM, user("Describe.", big)], conversation_key="c", generate_kwargs=GREEDY)

    body = proxy.bodies[-1]
    (image,) = sent_images(body)
    vision = tiny_settings(Path("m"), tmp_path).vision
    height, width = smart_resize(900, 1200, min_pixels=vision.min_pixels, max_pixels=vision.max_pixels)
    assert image.size == (width, height) and width * height <= vision.max_pixels
    assert (body["max_tokens"], body["temperature"], body["stream"]) == (12, 0.0, True)
    assert body["seed"] == 7, "extra_body passes through as it is"
    assert body["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}


async def test_sampling_options_map_to_openai_names(
    connect: Callable[..., Any], proxy: InferenceProxy
) -> None:
    options = {"max_new_tokens": 3, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    async with connect() as engine:
        await generate(engine, [user("hi")], conversation_key="c", generate_kwargs=options)
        # top_k and repetition_penalty have no OpenAI name: they go as vLLM's and SGLang's extra fields,
        # which transformers serve refuses (422): a clear sentence, not a hang.
        with pytest.raises(ServerRejected):
            await generate(
                engine, [user("hi")], conversation_key="c", generate_kwargs={**options, "top_k": 20}
            )

    body, refused = proxy.bodies[-2:]
    assert (body["max_tokens"], body["temperature"], body["top_p"]) == (3, 0.7, 0.9)
    assert "max_new_tokens" not in body and "do_sample" not in body and "top_k" not in body
    assert refused["top_k"] == 20


async def test_the_bot_queues_beyond_the_in_flight_limit_and_publishes_positions(
    connect: Callable[..., Any], proxy: InferenceProxy
) -> None:
    positions: dict[str, list[int]] = {name: [] for name in "abc"}
    async with connect(max_in_flight=1) as engine:
        with proxy.hold() as release:
            handles = [
                engine.submit(
                    EngineRequest(
                        [user(f"question {name}")], name, GREEDY, on_queue_position=positions[name].append
                    )
                )
                for name in "abc"
            ]
            while len(proxy.bodies) < 1:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            assert (engine.stats.running, engine.stats.queued, len(proxy.bodies)) == (1, 2, 1)
            release.set()
            results = await asyncio.gather(*(handle.result() for handle in handles))

    assert all(isinstance(result, GenerationResult) and result.text for result in results)
    assert positions == {"a": [0], "b": [1, 0], "c": [2, 1, 0]}
    assert proxy.most_in_flight == 1


async def test_429_and_503_are_retried_with_backoff_then_answered(
    connect: Callable[..., Any], proxy: InferenceProxy
) -> None:
    proxy.faults.extend([Fault(status=429, retry_after=0.2), Fault(status=503)])
    async with connect() as engine:
        result = await generate(engine, [user("hi")], conversation_key="c", generate_kwargs=GREEDY)
    assert result.text and len(proxy.bodies) == 3


async def test_5xx_past_the_retry_deadline_is_one_sentence(
    connect: Callable[..., Any], proxy: InferenceProxy
) -> None:
    proxy.faults.extend([Fault(status=500)] * 20)
    async with connect(retry_deadline_seconds=0.6) as engine:
        started = time.monotonic()
        with pytest.raises(ServerUnavailable) as failure:
            await generate(engine, [user("hi")], conversation_key="c", generate_kwargs=GREEDY)
    assert time.monotonic() - started < 5
    assert 2 <= len(proxy.bodies) < 20
    assert failure.value.user_message == ServerUnavailable.user_message


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault(status=400, message="This model's maximum context length is 32768 tokens."), ContextTooLong),
        (Fault(status=400, message="Invalid image"), ServerRejected),
        (Fault(status=401, message="Invalid API key"), ServerRejected),
    ],
)
async def test_4xx_is_not_retried(
    connect: Callable[..., Any], proxy: InferenceProxy, fault: Fault, error: type[Exception]
) -> None:
    proxy.faults.append(fault)
    async with connect() as engine:
        with pytest.raises(error):
            await generate(engine, [user("hi")], conversation_key="c", generate_kwargs=GREEDY)
        assert len(proxy.bodies) == 1
        assert (await generate(engine, [user("hi")], conversation_key="c", generate_kwargs=GREEDY)).text


async def test_a_stream_cut_midway_keeps_the_shown_text_marked_incomplete(
    connect: Callable[..., Any], proxy: InferenceProxy
) -> None:
    proxy.faults.append(Fault(cut_after_text=True))
    streamed: list[str] = []
    async with connect() as engine:
        with pytest.raises(AnswerIncomplete) as failure:
            await generate(
                engine, [user("hi")], conversation_key="c", generate_kwargs=GREEDY, on_text=streamed.append
            )
        assert engine.stats.failed == 1
    shown = "".join(streamed)
    assert shown and failure.value.partial_text == shown
    assert failure.value.user_message.startswith(shown.rstrip())
    assert failure.value.user_message.endswith(AnswerIncomplete.note)
    assert len(proxy.bodies) == 1, "never retried once text was shown"


async def test_no_first_token_in_time_is_a_timeout(
    connect: Callable[..., Any], proxy: InferenceProxy
) -> None:
    proxy.faults.append(Fault(silence_seconds=5))
    async with connect(first_token_timeout_seconds=0.5) as engine:
        started = time.monotonic()
        with pytest.raises(ServerTimeout):
            await generate(engine, [user("hi")], conversation_key="c", generate_kwargs=GREEDY)
        assert time.monotonic() - started < 4


async def test_a_server_gone_down_is_told_within_seconds_and_back_up_answers_again(
    connect: Callable[..., Any], proxy: InferenceProxy
) -> None:
    async with connect() as engine:
        await proxy.go_down()
        started = time.monotonic()
        with pytest.raises(ServerUnavailable):
            await generate(engine, [user("hi")], conversation_key="c", generate_kwargs=GREEDY)
        assert time.monotonic() - started < 4, "connect_timeout_seconds = 1 bounds the retries"
        await proxy.come_back()
        assert (await generate(engine, [user("hi")], conversation_key="c", generate_kwargs=GREEDY)).text


async def test_ready_while_the_server_answers(
    tiny_model_dir: Path, tmp_path: Path, inference_server: InferenceServer, proxy: InferenceProxy
) -> None:
    engine = ServerEngine(server_settings(tiny_model_dir, tmp_path, proxy.base_url, inference_server.model))
    assert await engine.readiness() == "not started"
    await engine.start()
    try:
        assert await engine.readiness() is None, "the start's GET /v1/models stands for a few seconds"
        await proxy.go_down()
        started = time.monotonic()
        async with asyncio.timeout(10):  # then GET /v1/models is asked again, and refused
            while (reason := await engine.readiness()) is None:
                await asyncio.sleep(0.1)
        assert reason == "the inference server failed (APIConnectionError)"
        assert time.monotonic() - started > 1, "a verdict stands a few seconds: probes never flood the server"
        await proxy.come_back()
        assert (await generate(engine, [user("hi")], conversation_key="c", generate_kwargs=GREEDY)).text
        assert await engine.readiness() is None, "an answer is a successful contact"
    finally:
        await engine.stop(grace=10)
    assert await engine.readiness() == "stopped"


async def test_start_fails_in_one_sentence_when_the_server_is_never_up(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = server_settings(tiny_model_dir, tmp_path, f"http://127.0.0.1:{free_port()}/v1", "any")
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"cannot reach the inference server at http://127\.0\.0\.1"):
        await ServerEngine(settings).start()
    assert time.monotonic() - started < 4


async def test_start_fails_when_the_server_does_not_serve_the_model(
    tiny_model_dir: Path, tmp_path: Path, inference_server: InferenceServer
) -> None:
    settings = server_settings(tiny_model_dir, tmp_path, inference_server.base_url, "Qwen/Qwen2.5-VL-72B")
    with pytest.raises(ModelLoadError, match=r"does not serve 'Qwen/Qwen2.5-VL-72B' \(it serves '"):
        await ServerEngine(settings).start()


async def test_the_api_key_comes_from_the_named_variable(
    tiny_model_dir: Path,
    tmp_path: Path,
    proxy: InferenceProxy,
    inference_server: InferenceServer,
    monkeypatch,
) -> None:
    monkeypatch.setenv("MY_SERVER_KEY", "sk-secret-test-key")
    settings = server_settings(
        tiny_model_dir, tmp_path, proxy.base_url, inference_server.model, api_key_env="MY_SERVER_KEY"
    )
    assert "sk-secret-test-key" not in repr(settings)
    headers: list[str] = []
    original = proxy._forward

    async def recording_forward(request, body, **options):  # type: ignore[no-untyped-def]
        headers.append(request.headers.get("Authorization", ""))
        return await original(request, body, **options)

    proxy._forward = recording_forward  # type: ignore[method-assign]
    engine = ServerEngine(settings)
    await engine.start()
    await engine.stop()
    assert headers == ["Bearer sk-secret-test-key"]


async def test_a_video_is_refused_politely_when_the_server_takes_none(
    connect: Callable[..., Any], proxy: InferenceProxy, tmp_path: Path
) -> None:
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00" * 64)
    question = {
        "role": "user",
        "content": [{"type": "video", "video": str(video)}, {"type": "text", "text": "?"}],
    }
    async with connect() as engine:
        with pytest.raises(VideoNotSupported):
            await generate(engine, [question], conversation_key="c", generate_kwargs=GREEDY)
        # An old turn's video is left out (its text stays); the question is answered.
        result = await generate(engine, [question, assistant("ok"), user("hi")], conversation_key="c")
    assert result.text
    assert proxy.bodies[-1]["messages"][0]["content"] == [{"type": "text", "text": "?"}]


async def test_cancelling_a_running_request_stops_its_stream(
    connect: Callable[..., Any], proxy: InferenceProxy
) -> None:
    async with connect() as engine:
        with proxy.hold() as release:
            handle = engine.submit(EngineRequest([user("hi")], "c", GREEDY))
            while not proxy.bodies:
                await asyncio.sleep(0.01)
            handle.cancel()
            release.set()
            while engine.stats.running:
                await asyncio.sleep(0.01)
            assert (engine.stats.cancelled, engine.stats.aborted) == (1, 1)


async def test_stop_fails_the_queue_and_lets_the_running_answer_finish(
    connect: Callable[..., Any], proxy: InferenceProxy
) -> None:
    async with connect(max_in_flight=1) as engine:
        with proxy.hold() as release:
            running = engine.submit(EngineRequest([user("first")], "a", GREEDY))
            queued = engine.submit(EngineRequest([user("second")], "b", GREEDY))
            while not proxy.bodies:
                await asyncio.sleep(0.01)
            stopping = asyncio.create_task(engine.stop(grace=30))
            with pytest.raises(EngineStopped):
                await queued.result()
            release.set()
            assert (await running.result()).text
            await stopping
        with pytest.raises(EngineStopped):
            engine.submit(EngineRequest([user("late")], "c", GREEDY))


async def test_a_video_goes_inline_where_the_server_takes_videos(
    connect: Callable[..., Any], proxy: InferenceProxy, tmp_path: Path
) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(64)))
    question = {
        "role": "user",
        "content": [{"type": "video", "video": str(clip)}, {"type": "text", "text": "?"}],
    }
    # transformers serve cannot decode videos here (500); the proxy answers in its place, after recording.
    proxy.faults.append(Fault(status=400, message="unsupported"))
    async with connect(accepts_video=True) as engine:
        with pytest.raises(ServerRejected):
            await generate(engine, [question], conversation_key="c", generate_kwargs=GREEDY)

    (video_part, text_part) = proxy.bodies[-1]["messages"][0]["content"]
    assert video_part["type"] == "video_url" and text_part == {"type": "text", "text": "?"}
    url = video_part["video_url"]["url"]
    assert url.startswith("data:video/mp4;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == clip.read_bytes()


async def test_stop_ends_the_stream_and_keeps_the_text_so_far(
    connect: Callable[..., Any], proxy: InferenceProxy
) -> None:
    long_answer = {"max_new_tokens": 200, "do_sample": False}
    async with connect() as engine:
        full = await generate(
            engine, [user("tell me everything")], conversation_key="a", generate_kwargs=long_answer
        )
        handle: RequestHandle | None = None

        def stop_at_first_text(_delta: str) -> None:
            assert handle is not None
            handle.stop()

        handle = engine.submit(
            EngineRequest([user("tell me everything")], "b", long_answer, stop_at_first_text)
        )
        stopped = await handle.result()
    assert stopped.stopped and not full.stopped
    assert stopped.text and full.text.startswith(stopped.text) and len(stopped.text) < len(full.text)
