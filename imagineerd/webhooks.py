"""Webhooks: a finished job is announced to the endpoints that asked for it, durably.

The store writes a delivery owed (the outbox row) in the very transaction that finishes the
job, so a crash between the two loses nothing and invents nothing; this module's thread sends
what is due, records each attempt, and retries with exponential backoff and jitter until
``webhooks.retry_hours`` have passed. It runs beside the workers: a receiver that answers
slowly, or not at all, never holds up a job.

Deliveries are signed as the Standard Webhooks spec says (``webhook-id``,
``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256>`` of
``id.timestamp.body`` with the secret's bytes), so receivers verify them with that project's
libraries. A job's own ``webhook_url`` may only name a host in ``webhooks.allowed_hosts``:
otherwise anyone who may queue a job could make this server call any address it can reach.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from . import __version__
from .errors import StoreClosed, ValidationError
from .jobs import JobSpec
from .store import Delivery, Store

log = logging.getLogger(__name__)

#: Seconds a receiver has to answer.
TIMEOUT = 10.0
#: Deliveries sent per pass; the rest wait for the next.
BATCH = 20
#: How long a pass holds the deliveries it took (longer than sending a whole batch takes):
#: on a shared queue, another node's delivery thread leaves them alone meanwhile.
HOLD_SECONDS = BATCH * (TIMEOUT + 5)
#: The longest pause between two attempts, in seconds.
MAX_BACKOFF = 3600.0


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not an instruction: following one would let an allowed host
    send this server anywhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header for one message."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def backoff(attempts: int, rng: random.Random | None = None) -> float:
    """Seconds before the next attempt: doubling from 2 s, with jitter (half to one and a
    half times), at most an hour."""
    return min(MAX_BACKOFF, 2.0**attempts) * (rng or random).uniform(0.5, 1.5)


class Webhooks:
    """What the daemon owes endpoints, and the thread that pays it."""

    def __init__(self, store: Store, settings: Mapping[str, Any]) -> None:
        self.store = store
        self.endpoints = list(settings["endpoints"])
        self.allowed_hosts = {h.lower() for h in settings["allowed_hosts"]}
        self.job_secret = settings["job_secret"]
        self.retry_seconds = settings["retry_hours"] * 3600.0
        self.sent = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imagineerd-webhooks", daemon=True)

    # -- what is owed ------------------------------------------------------------------------
    def check(self, spec: JobSpec) -> None:
        """A job's own ``webhook_url`` must name an allowed host (400 otherwise)."""
        if not spec.webhook_url:
            return
        host = (urlsplit(spec.webhook_url).hostname or "").lower()
        if host not in self.allowed_hosts:
            allowed = ", ".join(sorted(self.allowed_hosts)) or "none are"
            raise ValidationError(
                f"webhook_url: {host!r} is not in webhooks.allowed_hosts ({allowed}); "
                "add it to config.yaml on the server to allow it",
                field="webhook_url",
            )

    def targets(self, spec: JobSpec, status: str) -> list[str]:
        """The URLs owed a delivery when a job ends ``status``."""
        event = f"job.{status}"
        urls = [e["url"] for e in self.endpoints if event in e["events"]]
        if spec.webhook_url:
            urls.append(spec.webhook_url)
        return urls

    def _secret(self, delivery: Delivery) -> str:
        for endpoint in self.endpoints:
            if endpoint["url"] == delivery.url:
                return endpoint["secret"]
        return self.job_secret

    # -- paying it -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread.ident is None:
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(TIMEOUT + 5)

    def wake(self) -> None:
        """A job finished: look for deliveries now rather than at the next pass."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                due = self.store.deliveries_due(time.time(), BATCH, hold=HOLD_SECONDS)
                for delivery in due:
                    if self._stopping.is_set():
                        return
                    self.deliver(delivery)
            except StoreClosed:
                return  # the daemon is gone; what is owed is sent after the next start
            except Exception:  # the thread outlives anything one pass can raise
                log.exception("webhooks: a delivery pass failed; trying again shortly")
                due = []
            if len(due) < BATCH:
                self._wake.wait(1.0)
                self._wake.clear()

    def deliver(self, delivery: Delivery) -> bool:
        """One attempt; True if the receiver took it (2xx)."""
        job = self.store.get(delivery.job_id)
        now = time.time()
        if job is None:
            self.store.record_delivery(delivery.id, now=now, delivered=False, error="job gone")
            return False
        timestamp = int(now)
        message_id = f"msg_{delivery.id}"
        body = json.dumps(
            {
                "type": delivery.event,
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp)),
                "data": job.to_dict(),
            },
            ensure_ascii=False,
        ).encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"imagineerd/{__version__}",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
        }
        secret = self._secret(delivery)
        if secret:
            headers["webhook-signature"] = sign(secret, message_id, timestamp, body)
        request = urllib.request.Request(delivery.url, data=body, headers=headers, method="POST")
        status: int | None = None
        error: str | None = None
        try:
            with _OPENER.open(request, timeout=TIMEOUT) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status, error = exc.code, f"HTTP {exc.code}"
        except Exception as exc:  # refused, timed out, DNS, TLS: tried again later
            error = f"{type(exc).__name__}: {exc}"[:500]
        ok = status is not None and 200 <= status < 300
        if ok:
            self.sent += 1
            self.store.record_delivery(delivery.id, now=time.time(), delivered=True, status=status)
            return True
        expired = time.time() - delivery.created_at > self.retry_seconds
        next_at = None if expired else time.time() + backoff(delivery.attempts + 1)
        if expired:
            log.warning(
                "webhooks: giving up on %s for job %s after %d attempts: %s",
                delivery.url,
                delivery.job_id,
                delivery.attempts + 1,
                error,
            )
        self.store.record_delivery(
            delivery.id,
            now=time.time(),
            delivered=False,
            status=status,
            error=error,
            next_at=next_at,
        )
        return False
