"""A real Milvus standalone server started from Python (PyPI `milvus`, "embedded Milvus"), for the tests
and `vdsh bench milvus`: the server binary the package bundles, its data in a directory of ours, its ports
chosen free on 127.0.0.1. Not for production: run Milvus itself there (docker-compose.yml).

The package's own start-up leaves two things we change: its embedded etcd always listens on peer port 2380
(a second server on the machine, say another test run, dies at start-up), so we give etcd a config file
with free ports; and it waits its full time-out for a server that has already died, so we watch the process.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

STOP_WAIT_S = 10  # an idle server exits at once; one holding collections can hang in its shutdown
START_WAIT_S = 180
_ETCD_CONFIG = """name: default
listen-client-urls: http://127.0.0.1:{client}
advertise-client-urls: http://127.0.0.1:{client}
listen-peer-urls: http://127.0.0.1:{peer}
initial-advertise-peer-urls: http://127.0.0.1:{peer}
initial-cluster: default=http://127.0.0.1:{peer}
"""


class EmbeddedMilvus:
    """Start with `start()`, stop with `stop()` (graceful: SIGTERM, then a kill after STOP_WAIT_S);
    `start()` again on the same directory brings back what was stored."""

    def __init__(self, data_dir: str | Path):
        try:
            from milvus import MilvusServer, MilvusServerConfig
        except ImportError as error:
            raise ImportError("the embedded Milvus server needs the `milvus` package: pip install 'vdsh[milvus-embedded]'") from error
        import milvus

        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        etcd_config = self.data_dir / "embed-etcd.yaml"
        template = (Path(milvus.__file__).parent / "data" / "config.yaml.template").read_text()
        marker = "  use:\n    embed: true"
        if marker not in template:
            raise RuntimeError(f"milvus {milvus.__version__}: its config template has changed; pin milvus<2.4")
        template = template.replace(marker, f"  config:\n    path: {etcd_config}\n{marker}", 1)
        (self.data_dir / "milvus.yaml.template").write_text(template)
        config = MilvusServerConfig(data_dir=str(self.data_dir), template=str(self.data_dir / "milvus.yaml.template"))
        config.glog_conf_file = str(Path(milvus.__file__).parent / "data" / "glog.conf")  # set only for its own template
        self._server = MilvusServer(config, wait_for_started=False)

    def start(self) -> "EmbeddedMilvus":
        """Start the server and return once it answers its health check; RuntimeError if it dies first."""
        # new etcd ports at every start: a killed server's ports may not be free again yet
        client, peer = _free_port(), _free_port()
        (self.data_dir / "embed-etcd.yaml").write_text(_ETCD_CONFIG.format(client=client, peer=peer))
        self._server.config.update(etcd_port=client)
        self._server.start()
        process, url = self._server.server_proc, f"http://127.0.0.1:{self._server.webservice_port}/healthz"
        deadline = time.monotonic() + START_WAIT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._server.stop()
                log = self.data_dir / "logs" / "milvus-stdout.log"
                errors = [line for line in log.read_text(errors="replace").splitlines() if "[ERROR]" in line]
                raise RuntimeError(f"Milvus exited with {process.returncode} at start-up: {' | '.join(errors[-3:])[:2000]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if b"OK" in answer.read():
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        self.stop(wait_s=0)
        raise TimeoutError(f"Milvus did not answer {url} within {START_WAIT_S} s")

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
        if process is not None:  # the one file it writes outside its data directory
            Path(f"/tmp/milvus/server_id_{process.pid}").unlink(missing_ok=True)

    def __enter__(self) -> "EmbeddedMilvus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
