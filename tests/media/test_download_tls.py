"""Redirects between https and http: a downgrade is refused before the http host is contacted.

The https side is a real TLS server on 127.0.0.1 with a throwaway self-signed certificate made by the
`openssl` command (the test is skipped without it); the http side is the usual loopback media server.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from bot.errors import HostNotAllowed
from bot.media import MediaFetcher
from bot.media.download import INSECURE_REDIRECT_MESSAGE, check_redirect
from bot.settings import MediaSettings
from tests.media.conftest import MediaServer, running_media_server
from tests.media.factories import encode, two_colour_image

PNG_BYTES = encode(two_colour_image(), "PNG")


def test_a_redirect_may_not_downgrade_https_to_http() -> None:
    settings = MediaSettings(allowed_hosts=["cdn.example.com"])
    secure, clear = URL("https://cdn.example.com/a.png"), URL("http://cdn.example.com/b.png")
    with pytest.raises(HostNotAllowed) as caught:
        check_redirect(secure, clear, settings)
    assert caught.value.user_message == INSECURE_REDIRECT_MESSAGE
    check_redirect(secure, URL("https://cdn.example.com/b.png"), settings)
    check_redirect(clear, secure, settings)  # an upgrade is fine
    check_redirect(
        clear, URL("http://cdn.example.com/c.png"), settings
    )  # http all along: only the host counts
    with pytest.raises(HostNotAllowed):
        check_redirect(secure, URL("https://evil.example.com/b.png"), settings)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    command = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    command += ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        command,
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


@pytest.fixture
async def tls_server(certificate: tuple[Path, Path]) -> AsyncIterator[MediaServer]:
    """A loopback https server whose routes the test sets."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(*certificate)
    async with running_media_server(server_context) as server:
        yield server


@pytest.fixture
async def tls_fetcher(
    certificate: tuple[Path, Path], media_settings: MediaSettings, tmp_path: Path
) -> AsyncIterator[MediaFetcher]:
    """A fetcher whose session trusts the test certificate (and nothing else)."""
    client_context = ssl.create_default_context(cafile=str(certificate[0]))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context)) as session,
        MediaFetcher(media_settings, tmp_path / "media", session=session) as fetcher,
    ):
        yield fetcher


def redirect_to(location: str) -> web.RequestHandler:
    async def moved(_request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(location)

    return moved


async def test_https_to_https_redirect_is_followed(
    tls_server: MediaServer, tls_fetcher: MediaFetcher
) -> None:
    tls_server.serve_bytes("/real.png", PNG_BYTES)
    tls_server.handlers["/old.png"] = redirect_to(tls_server.url("/real.png"))

    stored = await tls_fetcher.fetch(tls_server.url("/old.png"))

    assert stored.width == 40
    assert tls_server.requests == ["/old.png", "/real.png"]


async def test_https_to_http_redirect_is_refused_before_connecting(
    tls_server: MediaServer, media_server: MediaServer, tls_fetcher: MediaFetcher
) -> None:
    clear_url = media_server.serve_bytes("/clear.png", PNG_BYTES)
    tls_server.handlers["/secure.png"] = redirect_to(clear_url)

    with pytest.raises(HostNotAllowed) as caught:
        await tls_fetcher.fetch(tls_server.url("/secure.png"))

    assert caught.value.user_message == INSECURE_REDIRECT_MESSAGE
    assert tls_server.requests == ["/secure.png"]  # a refusal, not a transient failure: no retry
    assert media_server.requests == []
