"""Live previews on their way to clients: small JPEGs as ``job.preview`` events.

The worker hands over a preview still being copied off the GPU and goes straight on with
the next step; a thread of its own here waits for the pixels, encodes them and publishes.
Only the newest preview of each job is kept: if encoding ever fell behind, older ones are
skipped rather than queued, so previews can never hold up a batch or grow memory.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: Previews are made at the latents' size (an eighth of the image's); they are shown larger
#: than that, so a little more JPEG quality than usual keeps them from looking blocky.
JPEG_QUALITY = 85


class PreviewFeed:
    """Encodes previews off the worker thread and publishes them while their job runs."""

    def __init__(
        self,
        publish: Callable[[str, dict[str, Any]], Any],
        running: Callable[[int], bool],
    ) -> None:
        self._publish = publish
        self._running = running
        self._latest: dict[int, tuple[int, int, Any]] = {}
        self._sent: dict[int, dict[str, Any]] = {}  # the last event of each running job
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="imagineerd-previews", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._wake:
            self._stopping = True
            self._latest.clear()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def offer(self, job_id: int, step: int, total: int, pixels: Any) -> None:
        """Queue ``pixels`` (``.image()`` gives the PIL image) as the job's newest preview."""
        with self._wake:
            if self._stopping:
                return
            self._latest[job_id] = (step, total, pixels)
            self._wake.notify()

    def latest(self, job_id: int) -> dict[str, Any] | None:
        """The last preview event published for a job that still runs here, or None."""
        with self._wake:
            event = self._sent.get(job_id)
        return event if event is not None and self._running(job_id) else None

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._latest and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                job_id, (step, total, pixels) = self._latest.popitem()
            try:
                event = self._event(job_id, step, total, pixels)
                # A preview that was still encoding when its job finished would arrive
                # after the image and replace it on screen: drop it instead.
                if self._running(job_id):
                    self._publish("job.preview", event)
                    with self._wake:
                        self._sent[job_id] = event
                        for done in [j for j in self._sent if not self._running(j)]:
                            del self._sent[done]
            except Exception:  # a preview is a nicety: never let one stop the rest
                log.exception("publishing a preview of job %s failed", job_id)

    @staticmethod
    def _event(job_id: int, step: int, total: int, pixels: Any) -> dict[str, Any]:
        image = pixels.image()
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        return {
            "id": job_id,
            "step": step,
            "total": total,
            "width": image.width,
            "height": image.height,
            "image": f"data:image/jpeg;base64,{data}",
        }
