"""A real Chromium on a page of another origin tries to drive the API (CSRF)."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .conftest import wait_for
from .test_ui import browser  # noqa: F401  (the module's Chromium fixture, skips without it)

ATTACK = """<!doctype html>
<form id="form" method="POST" action="{api}/api/generate" enctype="text/plain" target="sink">
  <input name='{{"prompt": "form post", "x": "' value='"}}'>
</form>
<iframe name="sink"></iframe>
<script>
(async () => {{
  const api = "{api}";
  const body = JSON.stringify({{ prompt: "no-cors blob" }});
  const tries = [
    // No Content-Type at all, and no preflight: the one that worked.
    fetch(api + "/api/generate", {{ method: "POST", mode: "no-cors", body: new Blob([body]) }}),
    fetch(api + "/api/jobs/{job}/interrupt", {{ method: "POST", mode: "no-cors" }}),
    fetch(api + "/api/generate", {{ method: "POST", mode: "no-cors", body }}),
    // JSON or DELETE: the browser asks first (CORS preflight), and is not allowed.
    fetch(api + "/api/generate", {{
      method: "POST", headers: {{ "Content-Type": "application/json" }}, body }}),
    fetch(api + "/api/jobs/{job}", {{ method: "DELETE" }}),
  ];
  for (const attempt of tries) await attempt.catch(() => null);
  document.getElementById("form").submit();
  document.title = "sent";
}})();
</script>
"""


def serve_page(host: str, html: str) -> ThreadingHTTPServer:
    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            data = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# 127.0.0.2 is another site to the browser; another port of the same address is the same
# site but another program, which must not drive the API either.
@pytest.mark.parametrize("page_host", ["127.0.0.2", "127.0.0.1"])
def test_a_page_of_another_origin_cannot_queue_cancel_or_interrupt(
    start_api,
    browser,  # noqa: F811
    caplog,
    page_host,
):
    caplog.set_level(logging.INFO, logger="imagineerd.access")
    api = start_api()
    job = api("POST", "/api/generate", json={"prompt": "long", "steps": 150}).json()["id"]
    wait_for(lambda: api.daemon.job(job).status == "running", 60)
    site = serve_page(page_host, ATTACK.format(api=api.url, job=job))
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"http://{page_host}:{site.server_address[1]}/")
        page.wait_for_function("document.title === 'sent'", timeout=20000)

        def posts() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.name == "imagineerd.access"
                and '"POST /api/' in r.getMessage()
                and "Chrome" in r.getMessage()  # the browser's, not the test's own
            ]

        # The three no-cors POSTs and the form post reached the server, and were refused.
        wait_for(lambda: len(posts()) >= 4, 20)
        assert all('HTTP/1.1" 403 ' in line for line in posts()), posts()
    finally:
        context.close()
        site.shutdown()
        site.server_close()
    # Neither interrupted nor cancelled, and not one job more.
    assert api.daemon.job(job).status in ("running", "completed")
    assert sum(api.daemon.store.counts().values()) == 1, api.daemon.store.counts()
    api("POST", f"/api/jobs/{job}/interrupt", json={})
