"""Start `dockerworker start` as a real subprocess, the way operators run it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


class WorkerProcess:
    """One `dockerworker start` process; its output goes to a file the test can read."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dockerworker.cli", "start", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_for_output(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if time.monotonic() > deadline or not self.alive():
                raise AssertionError(f"worker never printed {text!r}; output:\n{self.output()}")
            time.sleep(0.2)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


def worker_env(api_url: str, **extra: str) -> dict[str, str]:
    """The test's environment minus any PREFECT_* of its own, pointed at `api_url`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DOCKERWORKER_"))}
    env["PREFECT_API_URL"] = api_url
    env["PYTHONUNBUFFERED"] = "1"
    # This machine reaches PyPI only from the host network, through a TLS-inspecting proxy.
    env["DOCKERWORKER_BUILD_NETWORK"] = "host"
    if Path(HOST_CA_BUNDLE).exists():
        env["DOCKERWORKER_BUILD_CA_BUNDLE"] = HOST_CA_BUNDLE
    env.update(extra)
    return env
