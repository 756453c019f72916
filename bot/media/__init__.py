"""Safe media: download from allow-listed hosts under byte and pixel caps, sniff, normalise, store by sha256.

download.py  allow-list, redirects, byte cap, timeouts, retries
sniff.py     the real type from the first bytes
decode.py    images → RGB PNG under the pixel cap; video frame size (PyAV)
storage.py   content-addressed, atomic writes
fetcher.py   MediaFetcher, the public entry point
"""

from bot.media.fetcher import MediaFetcher

__all__ = ["MediaFetcher"]
