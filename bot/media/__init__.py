"""Safe media: download from allow-listed hosts under byte and pixel caps, sniff, validate, store by sha256.

download.py  allow-list, redirects, byte cap, timeouts, retries
sniff.py     the real type from the first bytes
decode.py    images validated under the pixel cap, kept as sent or re-encoded; video frame size (PyAV)
storage.py   content-addressed, atomic writes
fetcher.py   MediaFetcher, the public entry point
"""

from bot.media.fetcher import MediaFetcher

__all__ = ["MediaFetcher"]
