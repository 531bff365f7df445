"""Real services for tests: an `mlflow server` on 127.0.0.1 with a SQLite backend.

The server can be stopped and started again on the same port (a tracking
outage, for real), and is always stopped at the end of the test using it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1:<port>, backed by <root>/mlflow.db, artifacts in <root>/artifacts."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "mlflow-server.log"

    def start(self, timeout: float = 90.0) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        # as `llmpipe ui` runs it: without MLflow's job runner and its 15 huey workers, which tracking never uses
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
                                     env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.uri} within {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its uvicorn workers
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


class S3Server:
    """An S3-compatible object store on 127.0.0.1 (moto's standalone server: real HTTP, the S3 API),
    with a bucket created, for `s3://` artifact roots reached through pyarrow's S3 filesystem."""

    ENV = {"AWS_ACCESS_KEY_ID": "llmpipe-test", "AWS_SECRET_ACCESS_KEY": "llmpipe-test", "AWS_DEFAULT_REGION": "us-east-1"}

    def __init__(self, root: Path, bucket: str = "llmpipe"):
        self.port = free_port()
        self.bucket = bucket
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log = Path(root) / "s3-server.log"
        self.proc: subprocess.Popen | None = None

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http"

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=self.ENV["AWS_ACCESS_KEY_ID"], secret_key=self.ENV["AWS_SECRET_ACCESS_KEY"],
                                 region=self.ENV["AWS_DEFAULT_REGION"], endpoint_override=self.endpoint, scheme="http",
                                 allow_bucket_creation=True)

    def start(self, timeout: float = 60.0) -> S3Server:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).parent / "moto_server"
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                self.filesystem().create_dir(self.bucket)
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"moto_server exited: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"no S3 server on {self.endpoint} within {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        self.proc = None
