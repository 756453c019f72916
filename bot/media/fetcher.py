"""`MediaFetcher`: the one entry point that turns a URL, bytes or a local file into `StoredMedia`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp

from bot.content import StoredMedia
from bot.engine.images import release_memory
from bot.errors import MediaError, TooLarge, Unreachable, UnsupportedMediaType
from bot.media.decode import image_size, probe_video, validate_image
from bot.media.decode_gate import DecodeGate
from bot.media.download import byte_cap, download
from bot.media.sniff import SNIFF_BYTES, MediaType, sniff
from bot.media.storage import content_path, reuse_existing, sha256_hex, store_content_addressed
from bot.metrics import Metrics
from bot.settings import MediaSettings

log = logging.getLogger("bot.media")


class MediaFetcher:
    """Downloads, validates and stores attachments under `media_dir`.

    Images that are already one upright RGB frame keep their bytes (JPEG, PNG, WebP); the others are
    re-encoded (see `bot.media.decode`). Videos keep their bytes. Files are named by the SHA-256 of the stored
    bytes, so the same file posted twice is stored once, and an upload whose own hash is already stored is
    not decoded again (only validated images are ever stored). All decoding and disk work runs in worker
    threads; decodes wait for each other while their pixels together would pass `media.max_pixels`
    (`DecodeGate`), so big images posted at once are decoded one after another instead of all in memory.
    Failures are the `MediaError` subclasses of `bot.errors`; `metrics` counts them, the bytes received and
    the decodes that waited.
    """

    def __init__(
        self,
        settings: MediaSettings,
        media_dir: Path,
        *,
        session: aiohttp.ClientSession | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._media_dir = media_dir.resolve()
        self._session = session
        self._owns_session = session is None
        self._metrics = metrics or Metrics()
        # Pixels decoding at once: the largest image the cap allows decodes alone.
        self._decodes = DecodeGate(settings.max_pixels)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session if this fetcher created it."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(
        self, url: str, *, announced_size: int | None = None, announced_type: str | None = None
    ) -> StoredMedia:
        """Download `url` (an allow-listed http(s) URL) and store it; the announced size is checked first,
        against the cap of the announced type (Discord's content type, when known)."""
        with self._counting_failures():
            downloaded = await download(
                self._http(),
                url,
                self._settings,
                announced_size=announced_size,
                announced_type=announced_type,
            )
            self._metrics.media_received(len(downloaded.data))
            return await self._store(downloaded.data, downloaded.media_type)

    async def store_bytes(self, data: bytes) -> StoredMedia:
        """Validate and store media already in memory, under the same caps as a download."""
        with self._counting_failures():
            return await self._store_bytes(data)

    async def store_file(self, path: Path) -> StoredMedia:
        """Validate and store a local file; its size is checked before it is read."""
        with self._counting_failures():
            return await self._store_bytes(await self._read(path))

    @contextmanager
    def _counting_failures(self) -> Iterator[None]:
        try:
            yield
        except MediaError as exc:
            self._metrics.media_failed(exc)
            raise

    async def _store_bytes(self, data: bytes) -> StoredMedia:
        self._metrics.media_received(len(data))
        media_type = sniff(data[:SNIFF_BYTES])
        if media_type is None:
            raise UnsupportedMediaType("the bytes are not an accepted media type")
        cap = byte_cap(self._settings, media_type.kind)
        if len(data) > cap:
            raise TooLarge(f"{len(data)} bytes over {cap}", limit_bytes=cap, kind=media_type.kind)
        return await self._store(data, media_type)

    async def _read(self, path: Path) -> bytes:
        cap = byte_cap(self._settings, None)
        try:
            size = await asyncio.to_thread(lambda: path.stat().st_size)
            if size > cap:
                raise TooLarge(f"{path} has {size} bytes, over {cap}", limit_bytes=cap, kind="file")
            return await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise Unreachable(f"cannot read {path}: {exc}", user_message=f"I couldn't read {path}.") from None

    def _http(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop, and reused for every download.
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _store(self, data: bytes, media_type: MediaType) -> StoredMedia:
        if media_type.kind == "image":
            stored = await self._store_image(data, media_type)
        else:
            stored = await asyncio.to_thread(self._store_video, data, media_type)
        log.debug("stored %s %s (%d bytes)", stored.kind, stored.sha256, stored.byte_size)
        return stored

    async def _store_image(self, data: bytes, media_type: MediaType) -> StoredMedia:
        """The stored file, or else the size from the header; then the decode, once the gate admits it."""
        known = await asyncio.to_thread(self._stored_or_size, data, media_type)
        if isinstance(known, StoredMedia):
            return known
        digest, (width, height) = known
        async with self._decodes.admit(width * height) as waited:
            if waited:
                self._metrics.media_decode_waited()
            return await asyncio.to_thread(self._validate_and_store, data, media_type, digest)

    def _stored_or_size(
        self, data: bytes, media_type: MediaType
    ) -> StoredMedia | tuple[str, tuple[int, int]]:
        """The media when these bytes are stored already (hence validated: only the header is read), else
        their digest and the size their header announces (raising when it is over the caps)."""
        max_pixels = self._settings.max_pixels
        digest = sha256_hex(data)
        path = content_path(self._media_dir, digest, media_type.extension)
        width, height = image_size(data, media_type, max_pixels)
        if reuse_existing(path):
            return StoredMedia(digest, path, media_type.mime_type, width, height, len(data), "image")
        return digest, (width, height)

    def _validate_and_store(self, data: bytes, media_type: MediaType, digest: str) -> StoredMedia:
        image = validate_image(data, media_type, self._settings.max_pixels)
        release_memory(4 * image.width * image.height)  # the decoded pixels are freed by now
        digest, path = store_content_addressed(
            self._media_dir, image.data, image.media_type.extension, digest=digest if image.kept else None
        )
        mime_type = image.media_type.mime_type
        return StoredMedia(digest, path, mime_type, image.width, image.height, len(image.data), "image")

    def _store_video(self, data: bytes, media_type: MediaType) -> StoredMedia:
        width, height = probe_video(data, self._settings.max_pixels)
        digest, path = store_content_addressed(self._media_dir, data, media_type.extension)
        return StoredMedia(digest, path, media_type.mime_type, width, height, len(data), "video")
