"""Hostile inputs and clients, shared by the regression tests and `make resilience`.

Each is small to send and was expensive to receive before the service's
budgets: CPU (a JPEG of thousands of scans), memory (tiny files that decode to
huge frames), slots (uploads and headers that never finish), metrics (made-up
paths).
"""

from __future__ import annotations

import io
import socket
import zlib
from urllib.parse import urlsplit

import numpy as np
from PIL import Image


def scan_bomb_jpeg(side: int = 2048, copies: int = 3000) -> bytes:
    """A progressive JPEG whose smallest scan is repeated `copies` times (libjpeg decodes each, with a warning).

    A smooth image has refinement scans of a few bytes, so the file stays small, but before the scan
    budget every copy cost a pass over the whole image.
    """
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    channels = [np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, -ramp) / 2 + 128, np.full((side, side), 128)]
    pixels = np.stack(channels, -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90, progressive=True)
    data = buffer.getvalue()
    end = data.rindex(b"\xff\xd9")
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]
    scans = [data[start:stop] for start, stop in zip(starts, [*starts[1:], end], strict=True)]
    smallest = min(scans, key=len)
    return data[:end] + smallest * copies + data[end:]


def arithmetic_jpeg() -> bytes:
    """A JPEG whose frame header declares arithmetic coding (SOF9), which the decoder cannot read."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 120, 180)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    frame = data.index(b"\xff\xc0")
    return data[:frame] + b"\xff\xc9" + data[frame + 2 :]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")


def thin_png(width: int = 39_000_000) -> bytes:
    """A one-pixel-high grey PNG, `width` pixels wide: under the pixel cap, ~40 KB, a frame of width bytes."""
    header = width.to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])  # 8-bit grey
    pixels = zlib.compress(b"\x00" + bytes(width), 9)  # filter byte + one row of zeros
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")


def large_flat_webp(side: int = 6000) -> bytes:
    """A lossless WebP of one colour: a few KB that decode to side x side RGB."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (230, 230, 235)).save(buffer, format="WEBP", lossless=True, quality=0)
    return buffer.getvalue()


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "hostile-boundary") -> tuple[bytes, str]:
    """A multipart/form-data body of (field, filename or None for a text field, content) parts, and its
    Content-Type. Nothing is escaped: file names go on the wire as given."""
    def part(field: str, filename: str | None, content: bytes) -> bytes:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename is not None else "")
        kind = "Content-Type: application/octet-stream\r\n" if filename is not None else ""
        return f"--{boundary}\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode() + content + b"\r\n"

    body = b"".join(part(*p) for p in parts)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def stalled_upload(url: str, payload: bytes, share: float = 0.5, route: str = "/predict") -> socket.socket:
    """Open a connection, send headers and `share` of an upload's body, then stall; the socket stays open."""
    body, content_type = multipart([("file", "tile.jpeg", payload)])
    address = urlsplit(url)
    connection = socket.create_connection((address.hostname, address.port), timeout=30)
    head = (
        f"POST {route} HTTP/1.1\r\nHost: {address.hostname}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    connection.sendall(head + body[: int(len(body) * share)])
    return connection


def half_sent_headers(url: str) -> socket.socket:
    """Open a connection and send half a request header block; the socket stays open."""
    address = urlsplit(url)
    connection = socket.create_connection((address.hostname, address.port), timeout=30)
    connection.sendall(f"POST /predict HTTP/1.1\r\nHost: {address.hostname}\r\nContent-Ty".encode())
    return connection
