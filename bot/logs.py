"""Logging set-up for the command line: one format, quiet libraries, signed URLs redacted.

Discord's CDN signs attachment URLs in their query string (`?ex=…&is=…&hm=…`); with `-v`, discord.py's debug
lines and ours can carry them. Every record passes `RedactSignedUrls` on its way to the handler.
"""

from __future__ import annotations

import logging
import re

_URL_QUERY = re.compile(r"(https?://[^\s?#'\"<>]+)\?[^\s#'\"<>]*")
_QUIET = ("discord.http", "alembic.runtime.plugins")


class RedactSignedUrls(logging.Filter):
    """Drops the query string of every http(s) URL in a record's message."""

    def filter(self, record: logging.LogRecord) -> bool:
        # The message is formatted here once; the handler's formatter then reuses it as it is.
        record.msg, record.args = _URL_QUERY.sub(r"\1?<redacted>", record.getMessage()), None
        return True


def configure_logging(*, verbose: bool, level: int = logging.INFO) -> None:
    """Log to stderr at `level` (DEBUG when `verbose`), with signed URLs redacted."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactSignedUrls())
    for noisy in _QUIET:
        logging.getLogger(noisy).setLevel(logging.WARNING)
