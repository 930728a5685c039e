"""A real Milvus standalone server started from Python (PyPI `milvus`, "embedded Milvus"), for the tests
and `vdsh bench milvus`: the server binary the package bundles, its data in a directory of ours, its ports
chosen free on 127.0.0.1. Not for production: run Milvus itself there (docker-compose.yml).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

STOP_WAIT_S = 10  # an idle server exits in under a second; one holding collections can hang in its shutdown


class EmbeddedMilvus:
    """Start with `start()`, stop with `stop()` (graceful: SIGTERM, then a kill after STOP_WAIT_S);
    `start()` again on the same directory brings back what was stored."""

    def __init__(self, data_dir: str | Path):
        try:
            from milvus import MilvusServer, MilvusServerConfig
        except ImportError as error:
            raise ImportError("the embedded Milvus server needs the `milvus` package: pip install 'vdsh[milvus-embedded]'") from error
        self.data_dir = Path(data_dir)
        self._server = MilvusServer(MilvusServerConfig(data_dir=str(self.data_dir)))

    def start(self) -> "EmbeddedMilvus":
        self._server.start()  # returns once the server's health check answers (or raises)
        return self

    @property
    def pid(self) -> int | None:
        process = self._server.server_proc
        return process.pid if process is not None else None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._server.listen_port}"

    def uri(self, collection: str) -> str:
        return f"milvus://{self.address}/{collection}"

    def memory_mib(self) -> float:
        """The server process's resident memory (VmRSS), MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self, wait_s: float = STOP_WAIT_S) -> None:
        """SIGTERM, then SIGKILL if still running after `wait_s` (0: a kill, as when the process crashes)."""
        process = self._server.server_proc
        if process is not None:
            if wait_s > 0:
                process.terminate()
            try:
                process.wait(wait_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._server.stop()  # closes its log files

    def __enter__(self) -> "EmbeddedMilvus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
