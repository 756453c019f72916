"""Small media files built in memory for the tests (deterministic, milliseconds each)."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

RED = (220, 20, 20)
BLUE = (20, 20, 220)


def two_colour_image(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 2, height))
    return image


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def animated_gif() -> bytes:
    """Two frames: red, then blue."""
    frames = [Image.new("RGB", (16, 12), RED), Image.new("RGB", (16, 12), BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def animated_webp() -> bytes:
    frames = [Image.new("RGB", (16, 12), RED), Image.new("RGB", (16, 12), BLUE)]
    return encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True)


def exif_rotated_jpeg() -> bytes:
    """A 40x20 JPEG (left red, right blue) tagged with EXIF orientation 6 (display rotated 90° clockwise)."""
    return encode(two_colour_image(), "JPEG", quality=95, exif=exif_with_orientation(6))


def exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid 1-bit all-black PNG of width x height, about 50 KB: built row by row, never held whole."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return _png(width, height, 1, 0, idat)


def rgb16_png(width: int = 40, height: int = 20) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow reads it as mode RGB, cannot write it): left red, right blue."""
    pixels = two_colour_image(width, height).load()
    assert pixels is not None
    rows = []
    for y in range(height):
        row = b"".join(struct.pack(">HHH", *(value * 257 for value in pixels[x, y])) for x in range(width))
        rows.append(b"\x00" + row)
    return _png(width, height, 16, 2, zlib.compress(b"".join(rows)))


def video(container: str, codec: str, width: int = 64, height: int = 48, frames: int = 4) -> bytes:
    """A tiny video encoded with PyAV."""
    import av

    out = io.BytesIO()
    with av.open(out, mode="w", format=container) as muxer:
        stream = muxer.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            picture = Image.new("RGB", (width, height), (index * 40, 80, 160))
            for packet in stream.encode(av.VideoFrame.from_image(picture)):
                muxer.mux(packet)
        for packet in stream.encode():
            muxer.mux(packet)
    return out.getvalue()
