"""Turning request bodies into what the catalog takes, refusing bad input before it costs anything.

Size limits are enforced twice: a declared Content-Length over the limit is refused before a byte is
read, and the body stream is counted as it arrives, so a client that lies about (or omits) its length
is cut off at the limit too.
"""

from __future__ import annotations

import json
import re

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vdsh.app.server.budget import MemoryBudget, ServerBusy
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
    parsing can be used unchanged behind it. Each body reserves twice its length (the buffer and the
    form parser's copy; the limit when no length is declared) from the server's memory budget before
    it is read, until the answer is sent: a burst of large uploads waits, then gets 503, instead of
    filling memory.
    """

    def __init__(self, app: ASGIApp, limit: int, budget: MemoryBudget | None = None) -> None:
        self.app, self.limit, self.budget = app, limit, budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        if length is not None and length > self.limit:
            await send_json_error(send, 413, f"request body exceeds the limit of {self.limit} bytes")
            return
        reserved = 2 * (self.limit if length is None else length)
        if self.budget is not None:
            try:
                await self.budget.reserve(reserved)
            except ServerBusy as busy:
                await send_json_error(send, 503, str(busy), {"retry-after": str(busy.retry_after_s)})
                return
        try:
            await self._buffered(scope, receive, send)
        finally:
            if self.budget is not None:
                self.budget.release(reserved)

    async def _buffered(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks, received, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.limit:
                await send_json_error(send, 413, f"request body exceeds the limit of {self.limit} bytes")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False
        del chunks

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def send_json_error(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """An error answer from middleware (before FastAPI's handlers); the connection is closed after it,
    since the request body may be unread."""
    body = json.dumps({"detail": detail}).encode()
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *extra]})
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
    """Refuse wrong declared types, empty or oversized files, and bytes that are not the three formats
    (a part with no declared type, or application/octet-stream, is judged by its first bytes)."""
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared not in IMAGE_TYPES and declared not in ("application/octet-stream", ""):
        raise UnsupportedImage(f"unsupported content type {declared or 'none'!r}: send image/jpeg, image/png or image/webp")
    if len(data) > limit:
        raise UploadTooLarge(limit)
    if not data:
        raise UnsupportedImage("the uploaded file is empty")
    if sniff_image_format(data) is None:
        raise UnsupportedImage("the upload is not a JPEG, PNG or WebP image (unrecognised file signature)")


_HEX = re.compile(r"^[0-9a-fA-F]+$")
_BITS = re.compile(r"^[01]+$")
_SPACE = " \t\r\n"


def parse_code(text: str, bits: int) -> np.ndarray:
    """A code as hex (`0x` optional; 2 * ceil(bits/8) digits) or `bits` characters of 0/1 (`0b` optional),
    with surrounding white space and any spaces or underscores ignored -> packed uint8 (1, nbytes).
    ValueError saying the expected lengths. `code_pattern` is the same rule as a regular expression."""
    text = text.strip(_SPACE).replace(" ", "").replace("_", "")
    nbytes = code_bytes(bits)
    expected = f"a {bits}-bit code: {2 * nbytes} hex digits or {bits} bits of 0/1"
    prefix = text[:2].lower()
    if prefix == "0b" and not (len(text) == 2 * nbytes and _HEX.match(text)):  # "0b12ab34" is hex
        return _from_bits(text[2:], bits, expected)
    if prefix == "0x":
        return _from_hex(text[2:], bits, nbytes, expected)
    if len(text) == bits and _BITS.match(text) and len(text) != 2 * nbytes:
        return _from_bits(text, bits, expected)
    return _from_hex(text, bits, nbytes, expected)


def code_pattern(bits: int) -> str:
    """The codes `parse_code` accepts for this length, as an (ECMA-262) regular expression for OpenAPI."""
    gap, space = "[ _]*", "[ \\t\\r\\n]*"
    nbytes = code_bytes(bits)
    padding = 8 * nbytes - bits  # low bits of the last byte, which must be zero
    low_digit = {0: "[0-9a-fA-F]", 1: "[02468aceACE]", 2: "[048cC]", 3: "[08]", 4: "0"}
    if padding <= 4:
        tail, free = low_digit[padding] + gap, 2 * nbytes - 1
    else:
        tail, free = low_digit[padding - 4] + gap + "0" + gap, 2 * nbytes - 2
    hex_code = f"(?:0{gap}[xX]{gap})?(?:[0-9a-fA-F]{gap}){{{free}}}{tail}"
    bit_code = f"(?:0{gap}[bB]{gap})?(?:[01]{gap}){{{bits}}}"
    return f"^{space}{gap}(?:{hex_code}|{bit_code}){space}$"


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
