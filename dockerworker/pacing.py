"""How often the worker polls: often without the event stream, rarely with it.

While the server's event stream is connected, a run created now is announced by its Scheduled
event and polled for at once (events.py), so the poll is only the net for what the stream does
not tell in time: a run scheduled ahead (its event came when it was created, perhaps hours
before it is due), an event lost. It then polls every `--poll-interval-with-events` seconds
(30 by default: the server marks a pool's queues and deployments not ready after 60 s without
a poll) and looks that far ahead as well: a run falling due before the next poll is claimed
when it is due (`--prefetch-seconds` before its time, as with frequent polls), not at the next
poll. Without the stream (an old server, a proxy without websockets, a reconnection) it polls
every `--poll-interval` seconds, looking `--prefetch-seconds` ahead, as before. (With `--warm`
a second request looks further, only to warm ahead: ahead.py.)

`PollPacing` is the part of `Worker` (worker.py) that says when to poll and what to claim.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from .api import FlowRun
from .events import EventListener
from .settings import WorkerSettings


def scheduled_time(flow_run: FlowRun) -> datetime | None:
    """When the run is due: its next scheduled start (what the server's poll filters on)."""
    return flow_run.next_scheduled_start_time or flow_run.expected_start_time


class PollPacing:
    """When to poll, how far ahead to look, and which of the runs found to claim now."""

    settings: WorkerSettings
    events: EventListener | None

    _next_due: float | None = None  # monotonic: when a run found ahead becomes claimable

    def streaming(self) -> bool:
        """The event stream is connected: new runs are announced as they are scheduled."""
        return self.events is not None and self.events.connected.is_set()

    def poll_every(self) -> float:
        """Seconds between polls now, as the net (with the stream) or the means (without)."""
        if self.streaming():
            return max(self.settings.poll_interval, self.settings.poll_interval_with_events)
        return self.settings.poll_interval

    def slowest_poll_interval(self) -> float:
        """The longest the worker waits between polls in its current setup (for /health)."""
        if self.events is None:
            return self.settings.poll_interval
        return max(self.settings.poll_interval, self.settings.poll_interval_with_events)

    def _poll_interval(self) -> float:
        """The wait until the next poll: its interval, or less when a run found ahead falls
        due before then."""
        interval = self.poll_every()
        if self._next_due is not None:
            interval = min(interval, max(0.0, self._next_due - time.monotonic()))
        return interval

    def _poll_horizon(self) -> datetime:
        """Ask for runs scheduled up to the prefetch, and, while polls are rare, up to the
        next poll's prefetch too (so that none falls due unseen between two polls)."""
        ahead = self.settings.prefetch_seconds
        if self.streaming():
            ahead += self.poll_every()
        return datetime.now(UTC) + timedelta(seconds=ahead)

    def _due_now(self, runs: list[FlowRun]) -> tuple[list[FlowRun], list[FlowRun]]:
        """Those of `runs` to claim now (scheduled within the prefetch), and the others: the
        next poll comes when the first of them falls due."""
        now = datetime.now(UTC)
        claim_before = now + timedelta(seconds=self.settings.prefetch_seconds)
        due: list[FlowRun] = []
        later: list[tuple[datetime, FlowRun]] = []
        for flow_run in runs:
            at = scheduled_time(flow_run)
            if at is not None and at.tzinfo is None:
                at = at.replace(tzinfo=UTC)
            if at is None or at <= claim_before:
                due.append(flow_run)
            else:
                later.append((at, flow_run))
        self._next_due = None
        if later:
            wait = (min(at for at, _ in later) - claim_before).total_seconds()
            self._next_due = time.monotonic() + wait
        return due, [flow_run for _, flow_run in later]
