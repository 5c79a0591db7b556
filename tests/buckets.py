"""Real object-store servers on 127.0.0.1 for the tests (both sessions): moto's S3 server
and gcp-storage-emulator's GCS server, each a subprocess that the test stops."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from ports import free_port

BIN = Path(sys.executable).parent



class LocalServer:
    """A server subprocess on 127.0.0.1:`port`, up once it accepts connections."""

    def __init__(self, command: list[str], port: int) -> None:
        self.port = port
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{command[0]} did not start on port {port}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class S3(LocalServer):
    """moto's S3 API server. `env` is what a client (tapserve) is configured with: the
    standard AWS variables, a secret made for this run."""

    def __init__(self, port: int | None = None) -> None:
        port = port or free_port()
        super().__init__([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], port)
        self.secret = f"tapserve-test-secret-{uuid.uuid4().hex}"
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                    "AWS_ACCESS_KEY_ID": "tapserve-test-key", "AWS_SECRET_ACCESS_KEY": self.secret,
                    "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"],
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.secret, region_name="us-east-1")

    def bucket(self, name: str) -> Bucket:
        client = self.client()
        client.create_bucket(Bucket=name)
        return Bucket(client, name)


class Bucket:
    """Uploads and deletes in one bucket, the way an operator's tool would."""

    def __init__(self, client: Any, name: str) -> None:
        self.client, self.name = client, name

    def put(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=body)

    def upload(self, prefix: str, folder: Path) -> None:
        """Every file under `folder` to `prefix/<its path>`."""
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.put(f"{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes())

    def delete(self, prefix: str) -> None:
        """Every object under `prefix/`."""
        listing = self.client.list_objects_v2(Bucket=self.name, Prefix=prefix + "/")
        for item in listing.get("Contents", []):
            self.client.delete_object(Bucket=self.name, Key=item["Key"])


class GCS(LocalServer):
    """gcp-storage-emulator's GCS JSON API server (in memory); gcsfs and Google's client
    find it through STORAGE_EMULATOR_HOST."""

    def __init__(self) -> None:
        port = free_port()
        super().__init__([str(BIN / "gcp-storage-emulator"), "start", "--host", "127.0.0.1",
                          "--port", str(port), "--in-memory"], port)
        self.env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}
