"""Downloads against a real server on 127.0.0.1: allow-list, redirects, byte caps, retries and timeouts."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from bot.errors import (
    DownloadTimeout,
    HostNotAllowed,
    MediaError,
    TooLarge,
    Unreachable,
    UnsupportedMediaType,
)
from bot.media import MediaFetcher
from bot.media.download import check_allowed
from bot.settings import MediaSettings
from tests.media.conftest import MediaServer
from tests.media.factories import encode, two_colour_image

PNG_BYTES = encode(two_colour_image(), "PNG")


def assert_user_facing(error: MediaError) -> None:
    assert error.user_message.strip()
    assert "{" not in error.user_message  # every placeholder was filled


async def test_download_stores_the_image(media_server: MediaServer, fetcher: MediaFetcher) -> None:
    url = media_server.serve_bytes("/a.png", PNG_BYTES)
    stored = await fetcher.fetch(url + "?ex=1&hm=signature")
    assert (stored.kind, stored.mime_type, stored.width, stored.height) == ("image", "image/png", 40, 20)
    assert stored.path.is_absolute() and stored.path.is_file()
    assert media_server.requests == ["/a.png"]


async def test_host_off_the_allow_list_is_never_contacted(
    fetcher: MediaFetcher, started_requests: list[str]
) -> None:
    for url in ("http://10.255.255.1/x.png", "ftp://127.0.0.1/x.png", "file:///etc/passwd", "x.png"):
        started = time.monotonic()
        with pytest.raises(HostNotAllowed) as caught:
            await fetcher.fetch(url)
        assert time.monotonic() - started < 3  # refused before any connection (a connect would wait 5 s)
        assert_user_facing(caught.value)
    assert started_requests == []


def test_allow_list_match_is_exact_and_case_insensitive() -> None:
    settings = MediaSettings(allowed_hosts=["CDN.Example.com"])
    check_allowed(URL("https://cdn.example.COM/a.png"), settings)
    for url in ("https://evil.cdn.example.com/a.png", "https://cdn.example.com.evil.net/a.png"):
        with pytest.raises(HostNotAllowed):
            check_allowed(URL(url), settings)


async def test_redirect_is_followed_on_the_allowed_host(
    media_server: MediaServer, fetcher: MediaFetcher
) -> None:
    media_server.serve_bytes("/real.png", PNG_BYTES)

    async def moved(_request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/real.png")

    media_server.handlers["/old.png"] = moved
    stored = await fetcher.fetch(media_server.url("/old.png"))
    assert stored.width == 40
    assert media_server.requests == ["/old.png", "/real.png"]


async def test_redirect_off_the_allow_list_is_refused_before_connecting(
    media_server: MediaServer, fetcher: MediaFetcher, started_requests: list[str]
) -> None:
    port = URL(media_server.base_url).port

    async def away(_request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"http://127.0.0.2:{port}/x.png")

    media_server.handlers["/away.png"] = away
    with pytest.raises(HostNotAllowed) as caught:
        await fetcher.fetch(media_server.url("/away.png"))
    assert_user_facing(caught.value)
    assert media_server.requests == ["/away.png"]
    assert all(URL(url).host == "127.0.0.1" for url in started_requests)


async def test_redirect_loop_gives_up(media_server: MediaServer, fetcher: MediaFetcher) -> None:
    async def loop(_request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/loop.png")

    media_server.handlers["/loop.png"] = loop
    with pytest.raises(Unreachable):
        await fetcher.fetch(media_server.url("/loop.png"))
    assert 2 <= media_server.count("/loop.png") <= 5


@pytest.mark.parametrize("location", ["http://[::1/x.png", "http://127.0.0.1:99999/x.png"])
async def test_unparseable_redirect_is_unreachable(
    media_server: MediaServer, fetcher: MediaFetcher, location: str
) -> None:
    async def broken(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": location})

    media_server.handlers["/broken.png"] = broken
    with pytest.raises(Unreachable) as caught:
        await fetcher.fetch(media_server.url("/broken.png"))
    assert_user_facing(caught.value)
    assert media_server.requests == ["/broken.png"]  # a bad answer is not a transient one: no retry


async def test_announced_size_over_the_cap_makes_no_request(
    media_server: MediaServer,
    fetcher: MediaFetcher,
    media_settings: MediaSettings,
    started_requests: list[str],
) -> None:
    url = media_server.serve_bytes("/big.png", PNG_BYTES)
    with pytest.raises(TooLarge) as caught:
        await fetcher.fetch(url, announced_size=media_settings.max_video_bytes + 1)
    assert caught.value.limit_bytes == media_settings.max_video_bytes
    assert_user_facing(caught.value)
    assert media_server.requests == [] and started_requests == []


async def test_an_announced_image_is_held_to_the_image_cap_and_told_so(
    media_server: MediaServer, fetcher: MediaFetcher, media_settings: MediaSettings
) -> None:
    url = media_server.serve_bytes("/big.png", PNG_BYTES)
    over_image_cap = media_settings.max_bytes + 1  # under the (larger) video cap
    with pytest.raises(TooLarge) as image:
        await fetcher.fetch(url, announced_size=over_image_cap, announced_type="image/png")
    assert image.value.limit_bytes == media_settings.max_bytes
    assert "smaller image" in image.value.user_message
    with pytest.raises(TooLarge) as video:
        await fetcher.fetch(
            url, announced_size=media_settings.max_video_bytes + 1, announced_type="video/mp4"
        )
    assert video.value.limit_bytes == media_settings.max_video_bytes
    assert "smaller video" in video.value.user_message
    assert media_server.requests == []


async def test_content_length_over_every_cap_is_refused_before_the_body(
    media_server: MediaServer, fetcher: MediaFetcher, media_settings: MediaSettings
) -> None:
    body_written = asyncio.Event()

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 10**9
        await response.prepare(request)
        await media_server.release.wait()
        body_written.set()
        return response

    media_server.handlers["/huge.png"] = huge
    with pytest.raises(TooLarge) as caught:
        await fetcher.fetch(media_server.url("/huge.png"))
    assert caught.value.limit_bytes == media_settings.max_video_bytes
    assert not body_written.is_set()


async def test_image_content_length_over_the_image_cap(
    media_server: MediaServer, fetcher: MediaFetcher, media_settings: MediaSettings
) -> None:
    # Between the image and the video cap: refused once the first bytes show it is an image.
    url = media_server.serve_bytes("/big.png", PNG_BYTES + b"\0" * media_settings.max_bytes)
    with pytest.raises(TooLarge) as caught:
        await fetcher.fetch(url)
    assert caught.value.limit_bytes == media_settings.max_bytes
    assert_user_facing(caught.value)


async def test_chunked_body_is_cut_off_at_the_cap(
    media_server: MediaServer, fetcher: MediaFetcher, media_settings: MediaSettings
) -> None:
    total = 64 * 1024 * 1024
    sent = [0]

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = PNG_BYTES[:64].ljust(16 * 1024, b"\0")
        try:
            while sent[0] < total:
                await response.write(chunk)
                sent[0] += len(chunk)
        except (ConnectionError, RuntimeError):
            pass  # the client hung up, as it should
        return response

    media_server.handlers["/endless.png"] = endless
    with pytest.raises(TooLarge) as caught:
        await fetcher.fetch(media_server.url("/endless.png"))
    assert caught.value.limit_bytes == media_settings.max_bytes
    await asyncio.sleep(0.05)
    assert sent[0] < total // 4  # the client stopped reading long before the end
    assert media_server.count("/endless.png") == 1  # not retried


async def test_non_media_body_is_refused_whatever_its_name(
    media_server: MediaServer, fetcher: MediaFetcher
) -> None:
    url = media_server.serve_bytes("/notes.png", b"just some text, honestly\n" * 10, content_type="image/png")
    with pytest.raises(UnsupportedMediaType) as caught:
        await fetcher.fetch(url)
    assert_user_facing(caught.value)


@pytest.mark.parametrize("status", [400, 403, 404, 410, 429])
async def test_client_errors_are_not_retried(
    media_server: MediaServer, fetcher: MediaFetcher, status: int
) -> None:
    async def refuse(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=status)

    media_server.handlers["/gone.png"] = refuse
    with pytest.raises(Unreachable) as caught:
        await fetcher.fetch(media_server.url("/gone.png"))
    assert_user_facing(caught.value)
    assert media_server.count("/gone.png") == 1


async def test_server_error_then_success_is_retried(media_server: MediaServer, fetcher: MediaFetcher) -> None:
    async def flaky(request: web.Request) -> web.StreamResponse:
        if media_server.count(request.path) == 1:
            return web.Response(status=500)
        return web.Response(body=PNG_BYTES)

    media_server.handlers["/flaky.png"] = flaky
    stored = await fetcher.fetch(media_server.url("/flaky.png"))
    assert stored.width == 40
    assert media_server.count("/flaky.png") == 2


async def test_persistent_server_error_gives_up_after_the_retries(
    media_server: MediaServer, fetcher: MediaFetcher, media_settings: MediaSettings
) -> None:
    async def broken(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=503)

    media_server.handlers["/down.png"] = broken
    with pytest.raises(Unreachable) as caught:
        await fetcher.fetch(media_server.url("/down.png"))
    assert_user_facing(caught.value)
    assert media_server.count("/down.png") == media_settings.retries + 1


async def test_connection_reset_is_retried(media_server: MediaServer, fetcher: MediaFetcher) -> None:
    async def reset_once(request: web.Request) -> web.StreamResponse:
        if media_server.count(request.path) == 1:
            assert request.transport is not None
            request.transport.abort()
            await media_server.release.wait()
        return web.Response(body=PNG_BYTES)

    media_server.handlers["/reset.png"] = reset_once
    stored = await fetcher.fetch(media_server.url("/reset.png"))
    assert stored.height == 20
    assert media_server.count("/reset.png") == 2


async def test_one_deadline_bounds_the_whole_download_retries_included(
    media_server: MediaServer, tmp_path: Path, media_settings: MediaSettings
) -> None:
    settings = media_settings.model_copy(
        update={"total_timeout_seconds": 0.5, "retries": 2, "retry_backoff_seconds": 0.01}
    )
    answers = iter([500])  # one failure, then a host too slow for what is left of the deadline

    async def flaky_then_slow(_request: web.Request) -> web.StreamResponse:
        status = next(answers, None)
        if status is not None:
            return web.Response(status=status)
        await media_server.release.wait()
        return web.Response(body=PNG_BYTES)

    media_server.handlers["/slow.png"] = flaky_then_slow
    started = time.monotonic()
    async with MediaFetcher(settings, tmp_path) as fetcher:
        with pytest.raises(DownloadTimeout) as caught:
            await fetcher.fetch(media_server.url("/slow.png"))
    elapsed = time.monotonic() - started
    assert elapsed >= 0.5
    assert_user_facing(caught.value)
    # The second attempt was cut by the deadline and no third one started (with a deadline per attempt
    # there would have been three, taking over a second).
    assert media_server.count("/slow.png") == 2


async def test_connection_refused_is_unreachable(
    fetcher: MediaFetcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="bot.media")
    with socket.socket() as probe:  # a port that was free a moment ago, with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(Unreachable) as caught:
        await fetcher.fetch(f"http://127.0.0.1:{port}/x.png?hm=secret-signature")
    assert time.monotonic() - started < 4  # refused at once, not waited out
    assert_user_facing(caught.value)
    assert "Connect" in str(caught.value) and "secret-signature" not in str(caught.value) + caplog.text


async def test_own_session_is_shared_and_closed(
    media_server: MediaServer, tmp_path: Path, media_settings: MediaSettings
) -> None:
    url = media_server.serve_bytes("/a.png", PNG_BYTES)
    async with MediaFetcher(media_settings, tmp_path) as fetcher:
        first = await fetcher.fetch(url)
        second = await fetcher.fetch(url)
        session = fetcher._http()  # the session it made for itself
        assert not session.closed
    assert first == second
    assert len(set(media_server.peers)) == 1  # one keep-alive connection: one session for both downloads
    assert session.closed, "a session the fetcher made is closed with it"


async def test_logs_never_show_the_query_string(
    media_server: MediaServer, fetcher: MediaFetcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="bot.media")
    with pytest.raises(Unreachable) as caught:
        await fetcher.fetch(media_server.url("/missing.png?ex=1&hm=secret-signature"))
    assert "/missing.png" in caplog.text
    assert "secret-signature" not in caplog.text
    assert "secret-signature" not in str(caught.value)


async def test_given_session_is_left_open(
    media_server: MediaServer, tmp_path: Path, media_settings: MediaSettings
) -> None:
    url = media_server.serve_bytes("/a.png", PNG_BYTES)
    async with aiohttp.ClientSession() as session:
        async with MediaFetcher(media_settings, tmp_path, session=session) as fetcher:
            await fetcher.fetch(url)
        assert not session.closed


async def test_concurrent_downloads_of_one_picture(media_server: MediaServer, fetcher: MediaFetcher) -> None:
    url = media_server.serve_bytes("/a.png", PNG_BYTES)
    results = await asyncio.gather(*(fetcher.fetch(url) for _ in range(4)))
    assert len(set(results)) == 1 and results[0].path.is_file()
    assert not list(results[0].path.parent.glob(".incoming-*"))  # no temporary file left behind
