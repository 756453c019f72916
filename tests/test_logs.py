"""Logs never carry the signatures of Discord's CDN URLs."""

from __future__ import annotations

import io
import logging

from bot.logs import RedactSignedUrls

SIGNED = "https://cdn.discordapp.com/attachments/1/2/cat.png?ex=66&is=65&hm=0123abcdef&"


def test_signed_url_query_strings_are_redacted_in_any_record() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactSignedUrls())
    logger = logging.getLogger("test.logs.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("GET %s failed", SIGNED)
        logger.warning(
            "payload {'url': '%s', 'proxy_url': 'https://media.discordapp.net/x.png?hm=ff'}", SIGNED
        )
        logger.warning("no query here: https://discord.com/api/v10/gateway")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "hm=" not in text and "ex=66" not in text
    assert "https://cdn.discordapp.com/attachments/1/2/cat.png?<redacted>" in text
    assert "https://media.discordapp.net/x.png?<redacted>" in text
    assert "https://discord.com/api/v10/gateway" in text
