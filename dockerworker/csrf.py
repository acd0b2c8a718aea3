"""CSRF tokens for servers with `PREFECT_SERVER_CSRF_PROTECTION_ENABLED` (both majors).

`GET /csrf-token?client=…` gives a token for our client id; every write then carries
`Prefect-Csrf-Token` and `Prefect-Csrf-Client`. The token is renewed shortly before it
expires, or once when the server refuses it; a server without protection answers 422 (or 404
without the route), and no headers are sent.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx

log = logging.getLogger(__name__)
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CSRF_MARGIN = timedelta(seconds=30)  # fetch a new token this long before the old one expires


class CsrfTokens:
    """The worker's CSRF token for one client id; `enabled` None: not asked yet."""

    def __init__(self, http: Callable[[], httpx.Client]) -> None:
        self._http = http  # the API client's connection, as it is when a token is fetched
        self.client = f"dockerworker-{uuid.uuid4()}"
        self.enabled: bool | None = None
        self.token: str | None = None
        self.expires: datetime | None = None
        self.lock = threading.Lock()

    def fresh(self) -> bool:
        return self.token is not None and (
            self.expires is None or datetime.now(UTC) < self.expires - CSRF_MARGIN
        )

    def headers(self, method: str, refused: str | None = None) -> dict[str, str]:
        """The token headers for a write (none when protection is off), fetching a token
        first when there is none or it is about to expire. `refused`: the token the server
        just refused; a new one is fetched only if no other thread has done so meanwhile
        (each fetch replaces the server's token for our client id)."""
        if method.upper() not in WRITE_METHODS or self.enabled is False:
            return {}
        with self.lock:
            if (refused is not None and self.token == refused) or not self.fresh():
                self._fetch()
            if not self.enabled or self.token is None:
                return {}
            return {"Prefect-Csrf-Token": self.token, "Prefect-Csrf-Client": self.client}

    def _fetch(self) -> None:
        """`GET /csrf-token?client=…`: 422 means the server has protection off (a server
        without the route answers 404: off as well)."""
        response = self._http().get("csrf-token", params={"client": self.client})
        if response.status_code in (404, 422):
            self.enabled, self.token = False, None
            return
        response.raise_for_status()
        body = response.json()
        self.enabled, self.token = True, str(body["token"])
        try:
            self.expires = datetime.fromisoformat(str(body["expiration"]))
            if self.expires.tzinfo is None:
                self.expires = self.expires.replace(tzinfo=UTC)
        except (KeyError, ValueError):
            self.expires = None
        log.debug("CSRF token for client %s, valid until %s", self.client, self.expires)
