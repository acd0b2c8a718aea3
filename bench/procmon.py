"""Memory and CPU of a process and its descendants, read from /proc (Linux only)."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the `(comm)`; index 0 is the state (field 3)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """`root` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(
                    int(entry.name)
                )
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _status_kib(pid: int, key: str) -> int:
    """A `kB` value of /proc/<pid>/status (VmRSS, VmHWM); 0 when the process is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_mib(root: int) -> float:
    """Resident memory of the tree (sum of VmRSS), MiB."""
    return sum(_status_kib(pid, "VmRSS") for pid in descendants(root)) / 1024


def hwm_mib(root: int) -> float:
    """Sum of each live process's peak resident memory (VmHWM), MiB."""
    return sum(_status_kib(pid, "VmHWM") for pid in descendants(root)) / 1024


def cpu_seconds(root: int) -> float:
    """utime+stime of the live tree, plus the reaped children counted on `root`."""
    ticks = 0
    for pid in descendants(root):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = _stat_fields(pid)
            ticks += int(fields[11]) + int(fields[12])
            if pid == root:
                ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICK


class RssSampler:
    """Samples the tree's RSS every `interval` seconds in a thread and keeps the maximum."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        self.root = root
        self.interval = interval
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mib = max(self.peak_mib, rss_mib(self.root))

    def peak(self) -> float:
        """The larger of the sampled maximum and the tree's VmHWM sum (catches short spikes)."""
        return max(self.peak_mib, hwm_mib(self.root))
