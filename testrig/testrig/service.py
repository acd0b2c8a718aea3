"""A rig's service as a context manager: `with Server() as server:` starts it, and stops it
at the end, or at once when its start fails half-way (a port bound, a process begun)."""

from __future__ import annotations

from typing import Self


class Service:
    """Subclasses define start() and stop(); stop() must undo a partial start."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
