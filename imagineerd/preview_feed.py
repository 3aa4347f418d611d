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
    """Encodes previews off the worker thread and publishes them while their job runs.

    A job is live from its first preview until :meth:`forget` (called before its end is
    recorded and announced). The check that a job is live and the publishing happen under
    one lock that :meth:`forget` takes too, so no preview can follow the job's end event.
    """

    def __init__(self, publish: Callable[[str, dict[str, Any]], Any]) -> None:
        self._publish = publish
        # Waiting previews, oldest first: each job's newest only, re-queued at the end when
        # replaced, so every job of a batch gets its turn if encoding ever falls behind.
        self._waiting: dict[int, tuple[int, int, Any]] = {}
        self._live: set[int] = set()
        self._sent: dict[int, dict[str, Any]] = {}  # the last event of each live job
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="imagineerd-previews", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            self._waiting.clear()
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def offer(self, job_id: int, step: int, total: int, pixels: Any) -> None:
        """Queue ``pixels`` (``.image()`` gives the PIL image) as the job's newest preview."""
        with self._lock:
            if self._stopping:
                return
            self._live.add(job_id)
            self._waiting.pop(job_id, None)
            self._waiting[job_id] = (step, total, pixels)
            self._lock.notify()

    def forget(self, job_id: int) -> None:
        """The job ends (or goes back to the queue): none of its previews is sent after this
        returns, and :meth:`latest` has none for it."""
        with self._lock:
            self._live.discard(job_id)
            self._waiting.pop(job_id, None)
            self._sent.pop(job_id, None)

    def latest(self, job_id: int) -> dict[str, Any] | None:
        """The last preview event published for a job that is still live, or None."""
        with self._lock:
            return self._sent.get(job_id)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                job_id = next(iter(self._waiting))
                step, total, pixels = self._waiting.pop(job_id)
            try:
                event = self._event(job_id, step, total, pixels)  # may wait for the device
                with self._lock:
                    # A job that ended while its preview was encoded: its image is out (or
                    # on its way) and must not be replaced on screen by this.
                    if job_id in self._live:
                        self._publish("job.preview", event)
                        self._sent[job_id] = event
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
