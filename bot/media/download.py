"""Downloading one attachment safely: allow-listed hosts only (every redirect hop too), a byte cap enforced
on announced, declared and streamed sizes, timeouts, and retries with exponential backoff for transient
failures.

    HostNotAllowed    scheme not http(s), or host (or a redirect's host) not in `allowed_hosts`, or a redirect
                      from https down to http; no connection
    TooLarge          announced size, Content-Length or the streamed bytes over the cap
    UnsupportedMediaType  the first bytes are not a type we accept (the rest is not downloaded)
    Unreachable       404/403/410 and other 4xx, a redirect without a usable Location, too many redirects
                      at once; 5xx, refused or reset connections after retries
    DownloadTimeout   connect or total timeout, after retries

Before the first bytes are sniffed the cap of the kind Discord announced applies (the larger of the image and
video caps when it announced neither); from then on the cap of the sniffed kind.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp
from yarl import URL

from bot.content import MediaKind
from bot.errors import (
    DownloadTimeout,
    HostNotAllowed,
    MediaError,
    TooLarge,
    Unreachable,
    UnsupportedMediaType,
)
from bot.media.sniff import SNIFF_BYTES, MediaType, sniff
from bot.settings import MediaSettings

log = logging.getLogger("bot.media")

MAX_REDIRECTS = 3
CHUNK_BYTES = 64 * 1024
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
INSECURE_REDIRECT_MESSAGE = "That link redirected to an insecure (http) address, so I skipped it."


class _RetryableStatus(Exception):
    """A 5xx answer: the host may recover, so the download is tried again."""


@dataclass(frozen=True, slots=True)
class Downloaded:
    """The bytes of one download and the type sniffed from them."""

    data: bytes
    media_type: MediaType


def redact(url: str | URL) -> str:
    """The URL without query string or fragment (Discord CDN query strings are signatures), for logs."""
    try:
        return str(URL(url).with_query(None).with_fragment(None))
    except (TypeError, ValueError):
        return "<unparseable URL>"


def byte_cap(settings: MediaSettings, kind: MediaKind | None) -> int:
    """The byte cap for "image" or "video"; the larger cap while the kind is still unknown."""
    if kind is None:
        return max(settings.max_bytes, settings.max_video_bytes)
    return settings.max_video_bytes if kind == "video" else settings.max_bytes


def announced_kind(content_type: str | None) -> MediaKind | None:
    """The kind (image, video) of the type Discord announced for an attachment; None when it is neither."""
    family = (content_type or "").partition("/")[0].lower()
    if family == "image":
        return "image"
    return "video" if family == "video" else None


def _too_large(detail: str, cap: int, kind: MediaKind | None) -> TooLarge:
    return TooLarge(detail, limit_bytes=cap, kind=kind or "file")


def check_allowed(url: URL, settings: MediaSettings) -> None:
    """Raise HostNotAllowed unless `url` is http(s) on a host in the allow-list (exact, case-insensitive)."""
    allowed = {host.lower() for host in settings.allowed_hosts}
    if url.scheme not in ("http", "https") or (url.host or "").lower() not in allowed:
        log.warning("refused %s: host not on the allow-list", redact(url))
        raise HostNotAllowed(f"{redact(url)} is not on an allowed host")


def check_redirect(source: URL, target: URL, settings: MediaSettings) -> None:
    """Raise HostNotAllowed unless a redirect from `source` to `target` may be followed.

    Besides the allow-list, a redirect may not downgrade https to http: the rest of the download would go
    in clear text, open to tampering, although the link itself was secure.
    """
    if source.scheme == "https" and target.scheme == "http":
        log.warning("refused %s: redirect from https down to http", redact(target))
        raise HostNotAllowed(
            f"{redact(source)} redirected from https to {redact(target)}",
            user_message=INSECURE_REDIRECT_MESSAGE,
        )
    check_allowed(target, settings)


async def download(
    session: aiohttp.ClientSession,
    url: str,
    settings: MediaSettings,
    *,
    announced_size: int | None = None,
    announced_type: str | None = None,
) -> Downloaded:
    """Download `url` within the limits of `settings`, retrying transient failures.

    `total_timeout_seconds` bounds the whole download, retries and their backoff included. The size Discord
    announced is checked first, against the cap of the kind Discord announced (`announced_type`).
    """
    try:
        target = URL(url)
    except (TypeError, ValueError):
        raise HostNotAllowed("the URL does not parse") from None
    check_allowed(target, settings)
    kind = announced_kind(announced_type)
    cap = byte_cap(settings, kind)
    if announced_size is not None and announced_size > cap:
        log.warning("refused %s: announced %d bytes, cap %d", redact(target), announced_size, cap)
        raise _too_large(f"announced {announced_size} bytes", cap, kind)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.total_timeout_seconds
    failure: MediaError = Unreachable("no attempt made")
    for attempt in range(settings.retries + 1):
        try:
            async with asyncio.timeout_at(deadline):
                return await _attempt(session, target, settings)
        except TimeoutError:  # also aiohttp's connect/read timeouts, which subclass it
            failure = DownloadTimeout(f"{redact(target)} timed out")
        except _RetryableStatus as exc:
            failure = Unreachable(f"{redact(target)} answered HTTP {exc}")
        except aiohttp.ClientError as exc:  # refused, reset, disconnected, broken body
            failure = Unreachable(f"{redact(target)} failed: {_describe(exc)}")
        delay = settings.retry_backoff_seconds * 2**attempt
        if attempt == settings.retries or loop.time() + delay >= deadline:
            break
        log.warning("%s; retry %d of %d in %.2fs", failure, attempt + 1, settings.retries, delay)
        await asyncio.sleep(delay)
    log.warning("giving up: %s", failure)
    raise failure


async def _attempt(session: aiohttp.ClientSession, url: URL, settings: MediaSettings) -> Downloaded:
    """One try: follow up to MAX_REDIRECTS redirects by hand, checking each hop, then stream the body."""
    # The total limit is the `asyncio.timeout` around the whole attempt (all hops); this adds the connect one.
    timeout = aiohttp.ClientTimeout(
        total=None, connect=settings.connect_timeout_seconds, sock_connect=settings.connect_timeout_seconds
    )
    check_allowed(url, settings)  # every later hop passed `check_redirect`
    for _ in range(MAX_REDIRECTS + 1):
        log.debug("GET %s", redact(url))
        async with session.get(
            url, allow_redirects=False, timeout=timeout, headers={"Accept-Encoding": "identity"}
        ) as response:
            if response.status in _REDIRECT_STATUSES:
                location = response.headers.get("Location")
                if not location:
                    raise Unreachable(f"{redact(url)} redirected without a Location")
                try:
                    target = url.join(URL(location))
                except ValueError:  # yarl refuses e.g. an unclosed IPv6 bracket or a port out of range
                    raise Unreachable(f"{redact(url)} redirected to an unparseable Location") from None
                check_redirect(url, target, settings)
                url = target
                continue
            if response.status >= 500:
                raise _RetryableStatus(response.status)
            if not 200 <= response.status < 300:
                log.warning("%s answered HTTP %d", redact(url), response.status)
                raise Unreachable(f"{redact(url)} answered HTTP {response.status}")
            return await _read_body(response, url, settings)
    raise Unreachable(f"{redact(url)}: more than {MAX_REDIRECTS} redirects")


async def _read_body(response: aiohttp.ClientResponse, url: URL, settings: MediaSettings) -> Downloaded:
    """Stream the body, sniffing its type from the first bytes and stopping as soon as it passes the cap."""
    declared = response.content_length
    cap = byte_cap(settings, None)
    _check_size(declared, cap, url, "Content-Length")
    body = bytearray()
    media_type: MediaType | None = None
    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
        body += chunk
        if media_type is None and len(body) >= SNIFF_BYTES:
            media_type = _sniff_or_refuse(bytes(body[:SNIFF_BYTES]), url)
            cap = byte_cap(settings, media_type.kind)
            _check_size(declared, cap, url, "Content-Length", media_type.kind)
        _check_size(len(body), cap, url, "streamed bytes", media_type.kind if media_type else None)
    if media_type is None:  # a body shorter than SNIFF_BYTES
        media_type = _sniff_or_refuse(bytes(body), url)
        _check_size(len(body), byte_cap(settings, media_type.kind), url, "streamed bytes", media_type.kind)
    log.debug("downloaded %s: %d bytes of %s", redact(url), len(body), media_type.name)
    return Downloaded(bytes(body), media_type)


def _describe(exc: aiohttp.ClientError) -> str:
    """The error's type and OS cause; never its text, which can carry the URL with its signed query."""
    cause = getattr(exc, "os_error", None)
    return f"{type(exc).__name__} ({cause})" if cause is not None else type(exc).__name__


def _sniff_or_refuse(head: bytes, url: URL) -> MediaType:
    media_type = sniff(head)
    if media_type is None:
        log.warning("refused %s: not an accepted image or video type", redact(url))
        raise UnsupportedMediaType(f"{redact(url)} is not an accepted media type")
    return media_type


def _check_size(size: int | None, cap: int, url: URL, what: str, kind: MediaKind | None = None) -> None:
    if size is not None and size > cap:
        log.warning("refused %s: %s %d over the cap of %d bytes", redact(url), what, size, cap)
        raise _too_large(f"{what} {size} over {cap}", cap, kind)
