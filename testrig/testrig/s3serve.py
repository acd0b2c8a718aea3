"""An S3-compatible server on loopback for issue 16's pull-step tests (flow code pulled by
Prefect's `pull_from_remote_storage(url="s3://...")`), with authentication enforced.

It is moto's server (PyPI `moto[server]`) in a subprocess of its own, so moto's process-wide
auth switch never leaks into the test process. moto accepts anything until told otherwise, so
the rig makes an IAM user with an access key and an allow-S3 policy while auth is off, then
turns it on (`POST /moto-api/reset-auth 0`): from then on every request is checked, and a
wrong secret is answered `SignatureDoesNotMatch`, an unknown key id `InvalidAccessKeyId`
(both HTTP 403).

    with S3Server() as s3:
        s3.create_bucket("flows")
        s3.upload("flows", {"flow.py": "..."}, prefix="team/a")
        s3.endpoint_url, s3.key_id, s3.secret      # for AWS_* env or step parameters
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from .prefect_rig import free_port
from .service import Service

LOOPBACK = "127.0.0.1"
REGION = "us-east-1"
_S3_POLICY = json.dumps({
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
})


class S3Server(Service):
    """moto's S3 (and IAM) on 127.0.0.1:free port, auth enforced after set-up (a context
    manager). `key_id`/`secret` are the only credentials it accepts."""

    def __init__(self, user: str = "dockerworker-tests") -> None:
        self.user = user
        self.port = 0
        self.key_id = ""
        self.secret = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = Path(tempfile.mkstemp(prefix="dw-moto-", suffix=".log")[1])

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def env(self, endpoint_url: str | None = None) -> dict[str, str]:
        """AWS_* variables that point boto3/s3fs at this server with its credentials."""
        return {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": endpoint_url or self.endpoint_url,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self, service: str = "s3", key_id: str | None = None,
               secret: str | None = None) -> Any:
        """A boto3 client for this server (the rig's credentials unless others are given)."""
        import boto3

        return boto3.client(
            service, endpoint_url=self.endpoint_url, region_name=REGION,
            aws_access_key_id=self.key_id if key_id is None else key_id,
            aws_secret_access_key=self.secret if secret is None else secret,
        )

    def create_bucket(self, bucket: str) -> None:
        self.client().create_bucket(Bucket=bucket)

    def upload(self, bucket: str, files: Mapping[str, str | bytes], prefix: str = "") -> list[str]:
        """Put each file under `prefix/`; returns the keys written."""
        s3 = self.client()
        keys = []
        for name, content in files.items():
            key = f"{prefix.strip('/')}/{name}" if prefix.strip("/") else name
            s3.put_object(Bucket=bucket, Key=key,
                          Body=content.encode() if isinstance(content, str) else content)
            keys.append(key)
        return keys

    def start(self) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "inf"  # until set-up is done, below
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from moto.server import main; main()",
                 "-H", LOOPBACK, "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()
        iam = self.client("iam", key_id="setup", secret="setup")
        iam.create_user(UserName=self.user)
        iam.put_user_policy(UserName=self.user, PolicyName="s3-all", PolicyDocument=_S3_POLICY)
        key = iam.create_access_key(UserName=self.user)["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        answer = httpx.post(f"{self.endpoint_url}/moto-api/reset-auth", content=b"0",
                            trust_env=False, timeout=10)
        answer.raise_for_status()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited ({self._proc.returncode}): {self.log()}")
            try:
                if httpx.get(f"{self.endpoint_url}/moto-api/", trust_env=False,
                             timeout=1).status_code < 500:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"moto server not answering on {self.endpoint_url} in 30 s: {self.log()}")

    def log(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        self._log.unlink(missing_ok=True)
