"""Turning request bodies into what the catalog takes, refusing bad input before it costs anything.

Size limits are enforced twice: a declared Content-Length over the limit is refused before a byte is
read, and the body stream is counted as it arrives, so a client that lies about (or omits) its length
is cut off at the limit too.
"""

from __future__ import annotations

import re

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vdsh.index.codes import code_bytes

IMAGE_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WebP"}
MULTIPART_SLACK = 64 * 1024  # multipart boundaries and the small form fields around one image


class UploadTooLarge(Exception):
    """The request body exceeded the server's limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds the limit of {limit} bytes")
        self.limit = limit


class UnsupportedImage(Exception):
    """The upload is not a JPEG, PNG or WebP image (by declared type or by its first bytes)."""


class BodySizeLimit:
    """ASGI middleware: read the whole body up to `limit` bytes, answer 413 past it, then replay it.

    Buffering (bounded by the limit) means no route ever sees half a body, and FastAPI's own form
    parsing can be used unchanged behind it.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_413(send, self.limit)
            return
        chunks, received, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.limit:
                await _send_413(send, self.limit)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_413(send: Send, limit: int) -> None:
    body = f'{{"detail":"request body exceeds the limit of {limit} bytes"}}'.encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def sniff_image_format(data: bytes) -> str | None:
    """JPEG / PNG / WebP by magic bytes, else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def check_image_upload(content_type: str | None, data: bytes, limit: int) -> None:
    """Refuse wrong declared types, empty or oversized files, and bytes that are not the three formats."""
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared not in IMAGE_TYPES and declared != "application/octet-stream":
        raise UnsupportedImage(f"unsupported content type {declared or 'none'!r}: send image/jpeg, image/png or image/webp")
    if len(data) > limit:
        raise UploadTooLarge(limit)
    if not data:
        raise UnsupportedImage("the uploaded file is empty")
    if sniff_image_format(data) is None:
        raise UnsupportedImage("the upload is not a JPEG, PNG or WebP image (unrecognised file signature)")


_HEX = re.compile(r"^[0-9a-fA-F]+$")
_BITS = re.compile(r"^[01]+$")


def parse_code(text: str, bits: int) -> np.ndarray:
    """A code as hex (`0x` optional; 2 * ceil(bits/8) digits) or `bits` characters of 0/1 (`0b` optional)
    -> packed uint8 (1, nbytes). ValueError saying the expected lengths."""
    text = text.strip().replace(" ", "").replace("_", "")
    nbytes = code_bytes(bits)
    expected = f"a {bits}-bit code: {2 * nbytes} hex digits or {bits} bits of 0/1"
    if text.lower().startswith("0b"):
        return _from_bits(text[2:], bits, expected)
    if text.lower().startswith("0x"):
        return _from_hex(text[2:], bits, nbytes, expected)
    if len(text) == bits and _BITS.match(text) and len(text) != 2 * nbytes:
        return _from_bits(text, bits, expected)
    return _from_hex(text, bits, nbytes, expected)


def _from_bits(text: str, bits: int, expected: str) -> np.ndarray:
    if not _BITS.match(text or "x") or len(text) != bits:
        raise ValueError(f"code has {len(text)} characters, expected {expected}")
    return np.packbits(np.frombuffer(text.encode(), dtype=np.uint8) == ord("1"))[None]


def _from_hex(text: str, bits: int, nbytes: int, expected: str) -> np.ndarray:
    if not _HEX.match(text or "x"):
        raise ValueError(f"code is neither hex nor a 0/1 string; expected {expected}")
    if len(text) != 2 * nbytes:
        raise ValueError(f"code has {len(text)} hex digits, expected {expected}")
    packed = np.frombuffer(bytes.fromhex(text), dtype=np.uint8)[None].copy()
    padding = 8 * nbytes - bits
    if padding and packed[0, -1] & ((1 << padding) - 1):
        raise ValueError(f"the last {padding} bits of the hex code must be zero for a {bits}-bit code")
    return packed


def code_hex(packed: np.ndarray) -> str:
    return bytes(np.asarray(packed, dtype=np.uint8).ravel()).hex()
