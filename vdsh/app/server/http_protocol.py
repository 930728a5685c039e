"""uvicorn's h11 protocol with a deadline for request headers.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but waits forever for the headers
of a request that has begun: a client that opens connections and sends a few bytes (or nothing) holds
them open. Here every connection must deliver a request's complete headers within
`VDSH_SERVE_HEADER_TIMEOUT` seconds (default 10) of connecting, or of its previous answer; otherwise
it is closed. The body is bounded separately (size limit and the request time limit).
"""

from __future__ import annotations

import asyncio
import os

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT_S = 10.0


class HeaderTimeoutH11Protocol(H11Protocol):
    header_timeout_s = float(os.environ.get("VDSH_SERVE_HEADER_TIMEOUT", DEFAULT_HEADER_TIMEOUT_S))

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self._header_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm_header_deadline()  # the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # its headers are in
            self._cancel_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
