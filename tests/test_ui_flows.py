"""The web UI's flows in a real Chromium (Debian's), on a laptop-sized window and on a 375 px
touch phone, against a real server on the tiny model: results beside the form, a form that
sends only what the user set, prompt history, the viewer, the queue's Recent list, and what
the page says when the server goes away and comes back.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from .conftest import Api, wait_for

# test_ui skips the module where Debian's chromium is missing (and fails in CI).
from .test_ui import ARGS, CHROMIUM, _generate_bodies, _width, shot

DEVICES = ["desktop", "phone"]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


def new_context(browser, device: str, scheme: str = "light", locale: str = "de-DE"):
    """A laptop window or a 375 px touch phone; German dates, so a test can tell the
    browser's locale from the server's ISO strings."""
    if device == "phone":
        return browser.new_context(
            viewport={"width": 375, "height": 740},
            is_mobile=True,
            has_touch=True,
            device_scale_factor=2,
            color_scheme=scheme,
            locale=locale,
        )
    return browser.new_context(
        viewport={"width": 1280, "height": 900}, color_scheme=scheme, locale=locale
    )


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def page(browser, device) -> Iterator[Page]:
    context = new_context(browser, device)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, errors  # no uncaught JavaScript errors in any test


def submit_long(page: Page, prompt: str) -> None:
    """Submit from Create a job that runs a good while on the tiny model (150 steps at 96²,
    twice the work a step of 64²), long enough to watch, stop or lose its server."""
    page.fill("#prompt", prompt)
    page.fill("#steps", "150")
    page.fill("#width", "96")
    page.fill("#height", "96")
    page.click("#generate")


def box(page: Page, selector: str) -> dict:
    found = page.locator(selector).bounding_box()
    assert found, f"{selector} is not shown"
    return found


def status(page: Page):
    return page.locator("#create-status")


# -- Create: results beside the form -------------------------------------------------------
def test_results_show_progress_then_the_image(start_api, page: Page, device: str):
    api: Api = start_api()
    page.goto(api.url)
    expect(page.locator("#results-empty")).to_be_visible()
    # Beside the form on a laptop, below Generate on a phone.
    results, generate = box(page, "#create-side"), box(page, "#generate")
    if device == "desktop":
        assert results["x"] >= box(page, "#create-form")["x"] + box(page, "#create-form")["width"]
    else:
        assert results["y"] >= generate["y"] + generate["height"]
    page.fill("#prompt", "a lighthouse at dusk")
    page.fill("#steps", "150")
    page.click("#generate")
    card = page.locator('#results > li[data-job="1"]')
    expect(card).to_be_visible()
    expect(card).to_have_attribute("data-status", "running", timeout=30000)
    expect(status(page)).to_have_text("Job #1 is running.")
    wait_for(lambda: _width(card.locator(".progress > div")) > 0, 30)
    expect(card.locator(".progress-text")).to_contain_text("Step ")
    expect(page).to_have_title(re.compile(r"^\d+% · imagineerd$"))
    # It ends with its image in the card, and the status line says so (not "queued").
    expect(card).to_have_attribute("data-status", "done", timeout=120000)
    expect(status(page)).to_have_text("Job #1 is done.")
    expect(page).to_have_title("imagineerd")
    image = card.locator(".result-thumb img")
    wait_for(lambda: image.evaluate("img => img.naturalWidth") == 64, 10)
    expect(card.locator(".progress")).to_be_hidden()
    card.locator(".result-thumb").click()
    viewer = page.locator("#viewer")
    expect(viewer).to_be_visible()
    meta = page.locator("#viewer-meta")
    expect(meta).to_contain_text("a lighthouse at dusk")
    # The model by its name (the job records the path it was loaded from).
    model = meta.locator("dt:text-is('Model') + dd")
    expect(model).to_have_text("tiny-sd15")
    # The date as the browser's locale (German here) writes it, not the server's ISO text.
    created = meta.locator("dt:text-is('Created') + dd")
    expect(created).to_have_text(re.compile(r"^\d{2}\.\d{2}\.\d{4}, \d{2}:\d{2}$"))
    page.keyboard.press("Escape")
    expect(viewer).to_be_hidden()


def test_stop_keeps_the_focus_and_says_stopped(start_api, page: Page):
    api = start_api()
    page.goto(api.url)
    submit_long(page, "stop me")
    card = page.locator('#results > li[data-job="1"]')
    stop = card.get_by_role("button", name="Stop job 1")
    expect(stop).to_be_visible(timeout=30000)
    stop.focus()
    # Steps go by, the card is updated, and the keyboard focus stays on Stop.
    text = card.locator(".progress-text")
    expect(text).to_contain_text("Step ")
    before = text.inner_text()
    expect(text).not_to_have_text(before)
    expect(stop).to_be_focused()
    page.keyboard.press("Enter")
    expect(card).to_have_attribute("data-status", "stopped", timeout=30000)
    expect(card.locator(".state")).to_have_text("Stopped")
    expect(card).to_be_focused()  # its Stop is gone: the card has the focus, not the page
    expect(status(page)).to_have_text("Job #1 was stopped.")
    assert api.wait_job(1)["status"] == "cancelled"
    page.click("#tab-queue")
    expect(page.locator('#history li[data-job="1"] .state')).to_have_text("stopped")
    # A job cancelled while queued is not "stopped". (96 px: twice the work a step,
    # so the job is still running while the queue is looked at.)
    page.click("#tab-create")
    page.fill("#prompt", "long one")
    page.fill("#width", "96")
    page.fill("#height", "96")
    page.click("#generate")
    running = page.locator('#results > li[data-job="2"]')
    expect(running).to_have_attribute("data-status", "running", timeout=30000)
    page.fill("#prompt", "never runs")
    page.fill("#steps", "2")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.click("#generate")
    queued = page.locator('#results > li[data-job="3"]')
    expect(queued).to_have_attribute("data-status", "queued")
    cancel = queued.get_by_role("button", name="Cancel job 3")
    cancel.focus()
    page.keyboard.press("Enter")
    expect(queued.locator(".state")).to_have_text("Cancelled")
    # In the queue, the running card's Stop keeps the focus while the list is redrawn.
    page.click("#tab-queue")
    queue_stop = page.locator('#running .running-job[data-job="2"] button', has_text="Stop")
    queue_stop.focus()
    api("POST", "/api/generate", json={"prompt": "from a script", "steps": 2})
    expect(page.locator('#queued li[data-job="4"]')).to_be_visible()
    expect(queue_stop).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator('#history li[data-job="2"] .state')).to_have_text("stopped", timeout=30000)


def test_status_line_follows_copies_to_the_end(start_api, page: Page):
    api = start_api(workers=False)
    page.goto(api.url)
    page.fill("#prompt", "three")
    page.fill("#copies", "3")
    page.click("#generate")
    expect(status(page)).to_have_text("Queued 3 jobs (#1–#3).")
    api.daemon.start()
    expect(status(page)).to_have_text("3 jobs (#1–#3) are done.", timeout=120000)
    expect(page.locator('#results > li[data-status="done"]')).to_have_count(3)


# -- a form that can be trusted ------------------------------------------------------------
def test_only_changed_fields_are_sent_and_new_defaults_show(start_api, page: Page):
    api = start_api(workers=False)
    bodies = _generate_bodies(page)
    page.goto(api.url)
    expect(page.locator("#steps")).to_have_value("2")
    page.fill("#prompt", "a quiet harbour")
    page.fill("#steps", "3")
    page.click("#generate")
    expect(status(page)).to_have_text("Queued job #1.")
    assert bodies == [{"prompt": "a quiet harbour", "steps": 3}]
    # Another client changes the defaults: the fields not set here show them at once.
    changed = api("PUT", "/api/config/generation", json={"width": 72, "guidance_scale": 5})
    assert changed.status_code == 200, changed.text
    expect(page.locator("#width")).to_have_value("72")
    expect(page.locator("#guidance_scale")).to_have_value("5")
    expect(page.locator("#steps")).to_have_value("3")  # set here: kept
    page.click("#generate")
    expect(status(page)).to_have_text("Queued job #2.")
    assert bodies[1] == {"prompt": "a quiet harbour", "steps": 3}
    job = api("GET", "/api/jobs/2").json()
    assert (job["width"], job["guidance_scale"], job["steps"]) == (72, 5, 3)
    page.click("#form-reset")
    expect(page.locator("#steps")).to_have_value("2")


def test_prompts_survive_a_reload(start_api, page: Page):
    api = start_api(workers=False)
    page.goto(api.url)
    page.fill("#prompt", "a half-written prompt")
    page.fill("#negative_prompt", "blurry")
    page.reload()
    expect(page.locator("#prompt")).to_have_value("a half-written prompt")
    expect(page.locator("#negative_prompt")).to_have_value("blurry")
    bodies = _generate_bodies(page)
    page.click("#generate")
    expect(status(page)).to_have_text("Queued job #1.")
    assert bodies == [{"prompt": "a half-written prompt", "negative_prompt": "blurry"}]


def test_every_error_shows_at_once_in_plain_words(start_api, page: Page):
    api = start_api(workers=False)
    bodies = _generate_bodies(page)
    page.goto(api.url)
    expect(page.locator("#steps")).to_have_value("2")
    page.fill("#prompt", "   ")
    page.fill("#seed", "-1")
    page.fill("#steps", "0")
    page.fill("#width", "100")
    page.fill("#height", "4096")
    page.fill("#guidance_scale", "31")
    page.fill("#copies", "20")
    page.click("#generate")
    errors = {
        "prompt": "The prompt is empty: describe the picture",
        "seed": "Seed must be 0–2147483647",
        "steps": "Steps must be 1–150",
        "width": "Width must be a multiple of 8 (try 96 or 104)",
        "height": "Height must be 64–2048",
        "guidance_scale": "Guidance must be 0–30",
        "copies": "Copies must be 1–16",
    }
    for field, message in errors.items():
        expect(page.locator(f'#create-form [data-error-for="{field}"]')).to_have_text(message)
        if field != "copies":
            expect(page.locator(f"#{field}")).to_have_attribute("aria-invalid", "true")
    expect(status(page)).to_have_text("Nothing was sent: 7 fields need a fix (see below).")
    expect(page.locator("#prompt")).to_be_focused()  # the first of them
    assert bodies == [] and api.daemon.store.counts()["queued"] == 0
    # Fixing a field clears its message only.
    page.fill("#steps", "20")
    expect(page.locator('#create-form [data-error-for="steps"]')).to_have_text("")
    expect(page.locator('#create-form [data-error-for="width"]')).not_to_have_text("")
    for selector, value in [("#prompt", "fine now"), ("#seed", "2147483647"), ("#width", "96")]:
        page.fill(selector, value)
    page.fill("#height", "64")
    page.fill("#guidance_scale", "7")
    page.fill("#copies", "2")
    page.click("#generate")
    # Two copies count up from the seed: the highest seed has no room for the second.
    expect(page.locator('#create-form [data-error-for="seed"]')).to_have_text(
        "With 2 copies (one seed each, counting up) the seed must be at most 2147483646"
    )
    page.fill("#seed", "5")
    page.click("#generate")
    expect(status(page)).to_have_text("Queued 2 jobs (#1–#2).")
    assert [b["seed"] for b in bodies] == [5, 6]


def test_copies_refused_part_way_say_how_many_were_queued(start_api, page: Page):
    api = start_api(workers=False)
    seen: list[int] = []

    def third_refused(route) -> None:
        seen.append(1)
        if len(seen) == 3:
            route.fulfill(
                status=503,
                content_type="application/json",
                body='{"error": "the queue is full", "code": "unavailable", "status": 503}',
            )
        else:
            route.continue_()

    page.route("**/api/generate", third_refused)
    page.goto(api.url)
    page.fill("#prompt", "three wanted")
    page.fill("#copies", "3")
    page.click("#generate")
    expect(status(page)).to_have_text(
        "Only 2 of 3 copies were queued: the server refused the next one (the queue is full). "
        "Queued 2 jobs (#1–#2)."
    )
    expect(status(page)).to_have_class("status bad")
    expect(page.locator("#results > li")).to_have_count(2)
    assert api.daemon.store.counts()["queued"] == 2


# -- prompt history, the tab's title, sizes, the shortcut hint -----------------------------
def test_recent_prompts_are_searchable_and_stay_in_this_browser(start_api, page: Page):
    api = start_api(workers=False)
    page.goto(api.url)
    for count, prompt in enumerate(
        ("a red fox in snow", "a lighthouse at dusk", "a fox cub asleep"), start=1
    ):
        page.fill("#prompt", prompt)
        page.click("#generate")
        expect(page.locator("#results > li")).to_have_count(count)
    page.fill("#prompt", "")
    page.click("#prompt-history summary")
    items = page.locator("#history-list .history-item")
    expect(items).to_have_count(3)
    expect(items.first).to_contain_text("a fox cub asleep")  # newest first
    expect(page.locator("#history-search")).to_be_focused()
    page.fill("#history-search", "FOX")
    expect(items).to_have_count(2)
    page.fill("#history-search", "fox snow")
    expect(items).to_have_count(1)
    items.first.click()
    expect(page.locator("#prompt")).to_have_value("a red fox in snow")
    expect(page.locator("#prompt")).to_be_focused()
    page.reload()
    page.click("#prompt-history summary")
    expect(items).to_have_count(3)
    page.fill("#history-search", "whale")
    expect(items).to_have_count(0)
    expect(page.locator("#history-empty")).to_have_text("No recent prompt has these words.")
    page.fill("#history-search", "")
    page.click("#history-clear")
    expect(items).to_have_count(0)
    assert page.evaluate("localStorage.getItem('imagineerd.prompts')") == "[]"


# document.hidden as a test sets it: a headless page is never in the background by itself.
BACKGROUND = """
window.__hidden = false;
Object.defineProperty(document, "hidden", { get: () => window.__hidden });
Object.defineProperty(document, "visibilityState",
  { get: () => (window.__hidden ? "hidden" : "visible") });
window.__setHidden = (hidden) => {
  window.__hidden = hidden;
  document.dispatchEvent(new Event("visibilitychange"));
};
"""


def test_the_tab_title_says_done_for_a_background_tab(start_api, page: Page):
    api = start_api()
    page.add_init_script(BACKGROUND)
    page.goto(api.url)
    expect(page).to_have_title("imagineerd")
    page.fill("#prompt", "while away")
    # Hidden first: a two-step job can finish before a later hide reaches the page.
    page.evaluate("window.__setHidden(true)")
    page.click("#generate")
    expect(page).to_have_title("✓ Done · imagineerd", timeout=120000)
    page.evaluate("window.__setHidden(false)")
    expect(page).to_have_title("imagineerd")
    # Done while the tab is in front: nothing to call back.
    page.click("#generate")
    expect(page.locator('#results > li[data-job="2"]')).to_have_attribute(
        "data-status", "done", timeout=120000
    )
    expect(page).to_have_title("imagineerd")


def test_size_presets_follow_the_models_architecture(start_api, page: Page, model_files):
    api = start_api(workers=False, paths={"models": str(model_files)}, model={"name": "alpha"})
    page.goto(api.url)
    presets = page.locator("#size-preset")
    expect(presets.locator("optgroup")).to_have_attribute("label", "For SD1.5")
    expect(presets.locator("optgroup option").first).to_have_text("Square 512×512")
    assert "Square 1024×1024" not in presets.inner_text()
    xl = page.locator("#model option", has_text="gamma").get_attribute("value")
    page.select_option("#model", xl)
    expect(presets.locator("optgroup")).to_have_attribute("label", "For SDXL")
    expect(presets.locator("optgroup option").first).to_have_text("Square 1024×1024")
    assert "512×512" not in presets.inner_text()
    page.select_option("#size-preset", label="Portrait 832×1216")
    expect(page.locator("#width")).to_have_value("832")
    expect(page.locator("#height")).to_have_value("1216")


def test_the_shortcut_hint_only_where_there_is_a_keyboard(start_api, page: Page, device):
    api = start_api(workers=False)
    page.goto(api.url)
    hint = page.locator("#kbd-hint")
    if device == "phone":
        expect(hint).to_be_hidden()
    else:
        expect(hint).to_have_text("Ctrl/⌘ + Enter")
        expect(hint).to_be_visible()


# -- the viewer ----------------------------------------------------------------------------
def test_viewer_beside_its_metadata_with_keys_and_zoom(start_api, page: Page, device: str):
    api = start_api()
    for seed in (1, 2, 3):
        api(
            "POST",
            "/api/generate",
            json={"prompt": f"picture {seed} " + "long " * 60, "seed": seed},
        )
    for job in (1, 2, 3):
        assert api.wait_job(job)["status"] == "completed"
    page.goto(api.url + "/#gallery")
    thumbs = page.locator("#gallery .thumb")
    expect(thumbs).to_have_count(3)
    thumbs.first.click()  # the newest
    viewer = page.locator("#viewer")
    expect(viewer).to_be_visible()
    meta = page.locator("#viewer-meta")
    expect(meta).to_contain_text("picture 3")
    expect(page.locator("#viewer-count")).to_have_text("1 of 3")
    image = page.locator("#viewer-image")
    wait_for(lambda: image.evaluate("img => img.complete && img.naturalWidth") == 64, 10)
    stage, info = box(page, "#viewer-stage"), box(page, "#viewer-meta")
    if device == "desktop":  # side by side
        assert info["x"] >= stage["x"] + stage["width"] - 1
        assert info["y"] < stage["y"] + stage["height"]
    else:  # one above the other
        assert info["y"] >= stage["y"] + stage["height"] - 1
    # The actions stay in sight, however long the prompt.
    actions = box(page, ".viewer-actions")
    viewport = page.viewport_size
    assert viewport and actions["y"] + actions["height"] <= viewport["height"]
    expect(page.locator("#viewer-reuse")).to_be_in_viewport()
    # ← and → step through the gallery, Esc closes.
    page.keyboard.press("ArrowRight")
    expect(meta).to_contain_text("picture 2")
    expect(page.locator("#viewer-count")).to_have_text("2 of 3")
    page.keyboard.press("ArrowRight")
    expect(meta).to_contain_text("picture 1")
    expect(page.locator("#viewer-next")).to_be_disabled()
    page.keyboard.press("ArrowLeft")
    expect(meta).to_contain_text("picture 2")
    # 100%: the image at its own pixels (fitted, a 64 px image fills its frame).
    fitted = image.evaluate("img => img.getBoundingClientRect().width")
    page.click("#viewer-zoom")
    expect(page.locator("#viewer-zoom")).to_have_attribute("aria-pressed", "true")
    wait_for(lambda: image.evaluate("img => img.getBoundingClientRect().width") == 64, 10)
    assert fitted != 64
    page.click("#viewer-zoom")
    expect(page.locator("#viewer-zoom")).to_have_attribute("aria-pressed", "false")
    page.keyboard.press("Escape")
    expect(viewer).to_be_hidden()


# -- Queue: Recent ---------------------------------------------------------------------------
def test_recent_jobs_open_rerun_and_lend_their_settings(start_api, page: Page):
    api = start_api()
    api("POST", "/api/generate", json={"prompt": "the original", "seed": 77, "steps": 3})
    assert api.wait_job(1)["status"] == "completed"
    long = api("POST", "/api/generate", json={"prompt": "cut short", "steps": 150}).json()
    wait_for(lambda: api("GET", f"/api/jobs/{long['id']}").json()["status"] == "running", 60)
    api("POST", f"/api/jobs/{long['id']}/interrupt", json={})
    assert api.wait_job(long["id"])["status"] == "cancelled"
    page.goto(api.url + "/#queue")
    first = page.locator('#history li[data-job="1"]')
    expect(first.locator(".state")).to_have_text("completed")
    expect(page.locator('#history li[data-job="2"] .state')).to_have_text("stopped")
    thumb = first.locator(".history-thumb img")
    wait_for(lambda: thumb.evaluate("img => img.naturalWidth") > 0, 10)
    first.get_by_role("button", name="Open the image of job 1").first.click()
    expect(page.locator("#viewer")).to_be_visible()
    expect(page.locator("#viewer-meta")).to_contain_text("the original")
    page.keyboard.press("Escape")
    first.get_by_role("button", name="Re-run job 1").click()
    expect(page.locator('#history li[data-job="3"] .state')).to_have_text(
        "completed", timeout=120000
    )
    again = api("GET", "/api/jobs/3").json()
    assert (again["prompt"], again["seed"], again["steps"]) == ("the original", 77, 3)
    page.locator('#history li[data-job="1"]').get_by_role(
        "button", name="Use settings of job 1"
    ).click()
    expect(page.locator("#view-create")).to_be_visible()
    expect(page.locator("#prompt")).to_have_value("the original")
    expect(page.locator("#seed")).to_have_value("77")
    expect(page.locator("#steps")).to_have_value("3")


# -- Queue: steering it, pausing it ------------------------------------------------------------
QUEUE_ORDER = (
    "() => [...document.querySelectorAll('#queued li')].map((li) => Number(li.dataset.job))"
)


def queue_order(page: Page) -> list[int]:
    return page.evaluate(QUEUE_ORDER)


def test_steer_the_queue_live_in_every_page(start_api, browser, page: Page, device: str):
    api = start_api(workers=False)  # nothing runs: the jobs stay queued
    for n in (1, 2, 3):
        api("POST", "/api/generate", json={"prompt": f"job number {n}"})
    page.goto(api.url + "/#queue")
    other_context = new_context(browser, "desktop")
    other = other_context.new_page()
    try:
        other.goto(api.url + "/#queue")
        for each in (page, other):
            expect(each.locator("#queued li")).to_have_count(3)
        expect(page.locator("#connection")).to_have_class("connection live")
        expect(other.locator("#connection")).to_have_class("connection live")
        # What makes no sense where a job is says so (and stays focusable).
        first, last = (
            page.locator('#queued li[data-job="1"]'),
            page.locator('#queued li[data-job="3"]'),
        )
        expect(first.get_by_role("button", name="Move job 1 to the top")).to_be_disabled()
        expect(first.get_by_role("button", name="Move job 1 up")).to_be_disabled()
        expect(first.get_by_role("button", name="Move job 1 down")).to_be_enabled()
        expect(last.get_by_role("button", name="Move job 3 down")).to_be_disabled()
        expect(last.get_by_role("button", name="Move job 3 up")).to_be_enabled()
        # From the keyboard: the focus stays on the control pressed, in its moved card.
        up = page.get_by_role("button", name="Move job 3 up")
        up.focus()
        page.keyboard.press("Enter")
        wait_for(lambda: queue_order(page) == [1, 3, 2], 10)
        expect(up).to_be_focused()
        wait_for(lambda: queue_order(other) == [1, 3, 2], 10)  # the other page follows
        page.keyboard.press("Enter")
        wait_for(lambda: queue_order(page) == [3, 1, 2], 10)
        expect(up).to_be_focused()
        expect(up).to_be_disabled()  # first now: still focused, nothing more to do
        page.keyboard.press("Enter")  # does nothing
        expect(page.locator("#queued li .pos")).to_have_text(["1", "2", "3"])
        assert [j.id for j in api.daemon.store.queued()] == [3, 1, 2]
        # From the other page: this one follows.
        other.get_by_role("button", name="Move job 2 to the top").click()
        wait_for(lambda: queue_order(page) == [2, 3, 1], 10)
        top = page.get_by_role("button", name="Move job 3 down")
        top.click()
        wait_for(lambda: queue_order(page) == [2, 1, 3], 10)
        wait_for(lambda: queue_order(other) == [2, 1, 3], 10)
        expect(top).to_be_focused()
        expect(top).to_be_disabled()
        assert [j.id for j in api.daemon.store.queued()] == [2, 1, 3]
        # Pause: the toggle and its notice, here and in the other page.
        notice = "Queue paused — the running batch finishes, nothing new starts."
        page.click("#queue-pause")
        expect(page.locator("#queue-pause")).to_have_text("Resume queue")
        expect(page.locator("#queue-paused")).to_have_text(notice)
        expect(page.locator("#queue-pause")).to_be_focused()
        expect(other.locator("#queue-paused")).to_have_text(notice)
        expect(other.locator("#queue-pause")).to_have_text("Resume queue")
        assert api("GET", "/api/queue").json()["paused"] is True
        if device == "phone":
            controls = page.evaluate(CONTROLS)
            assert not [c for c in controls if c["width"] < 44 or c["height"] < 44], controls
            assert page.evaluate("document.documentElement.scrollWidth") <= 375
        # A reload keeps it (the server does); Create says it too.
        page.goto(api.url + "/#create")
        expect(page.locator("#create-paused")).to_contain_text("Queue paused")
        other.click("#queue-pause")
        expect(other.locator("#queue-pause")).to_have_text("Pause queue")
        expect(page.locator("#create-paused")).to_have_text("")
        expect(other.locator("#queue-paused")).to_be_hidden()
        assert api("GET", "/api/queue").json()["paused"] is False
    finally:
        other_context.close()


# -- a PNG's settings: dropped or pasted ---------------------------------------------------
MAKE_TRANSFER = """([bytes, name, type]) => {
  const data = new DataTransfer();
  data.items.add(new File([new Uint8Array(bytes)], name, { type }));
  return data;
}"""


def drop_file(page: Page, data: bytes, name: str, kind: str, zone: str = "#drop-settings"):
    """Drag a file over the page (the overlay shows), then drop it on a zone of it."""
    transfer = page.evaluate_handle(MAKE_TRANSFER, [list(data), name, kind])
    page.dispatch_event("main", "dragenter", {"dataTransfer": transfer})
    overlay = page.locator("#drop-overlay")
    expect(overlay).to_be_visible()
    page.dispatch_event(zone, "dragover", {"dataTransfer": transfer})
    expect(page.locator(zone)).to_have_class(re.compile(r"\bover\b"))
    page.dispatch_event(zone, "drop", {"dataTransfer": transfer})
    expect(overlay).to_be_hidden()


def paste_file(page: Page, data: bytes, name: str, kind: str) -> None:
    transfer = page.evaluate_handle(MAKE_TRANSFER, [list(data), name, kind])
    page.evaluate(
        "data => (document.activeElement || document.body).dispatchEvent("
        "new ClipboardEvent('paste', { clipboardData: data, bubbles: true }))",
        transfer,
    )


def a1111_png(text: str) -> bytes:
    """A PNG as A1111 writes one: its settings in a "parameters" text chunk."""
    import io

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    out = io.BytesIO()
    Image.new("RGB", (64, 72), "teal").save(out, "PNG", pnginfo=info)
    return out.getvalue()


A1111_TEXT = (
    "a castle on a hill at dawn\n"
    "Negative prompt: fog, people\n"
    "Steps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 4242, "
    "Size: 64x72, Model hash: 0123abcd, Model: beta, VAE: soft.safetensors, Clip skip: 2, "
    "Face restoration: CodeFormer, Version: v1.9.4"
)


def test_a_png_dropped_or_pasted_fills_the_form(
    start_api, page: Page, device: str, model_files, tmp_path
):
    api = start_api(paths={"models": str(model_files)}, model={"name": "alpha"})
    made = api(
        "POST",
        "/api/generate",
        json={
            "prompt": "a lighthouse in a storm",
            "negative_prompt": "calm sea",
            "seed": 9876,
            "steps": 3,
            "guidance_scale": 4.5,
            "scheduler": "euler_a",
            "loras": [{"name": "detail", "weight": 0.6}],
        },
    ).json()
    job = api.wait_job(made["id"], timeout=120)
    assert job["status"] == "completed", job
    ours = (api.daemon.outputs_dir / job["output_file"]).read_bytes()
    page.goto(api.url + "/#gallery")  # dropped anywhere: the form on Create is filled
    expect(page.locator("#model option")).to_have_count(3)  # alpha, beta, gamma
    drop_file(page, ours, "lighthouse.png", "image/png")
    expect(page.locator("#view-create")).to_be_visible()
    note = page.locator("#read-note-text")
    expect(note).to_contain_text(
        "Settings read from lighthouse.png: prompt, negative prompt, seed, steps, size 64×64, "
        "guidance, sampler, model, LoRA, clip skip."
    )
    expect(page.locator("#prompt")).to_have_value("a lighthouse in a storm")
    expect(page.locator("#negative_prompt")).to_have_value("calm sea")
    expect(page.locator("#seed")).to_have_value("9876")
    expect(page.locator("#steps")).to_have_value("3")
    expect(page.locator("#guidance_scale")).to_have_value("4.5")
    expect(page.locator("#scheduler")).to_have_value("euler_a")
    expect(page.locator("#lora-list .lora-weight")).to_have_value("0.6")
    # What the form now sends is that job again.
    bodies = _generate_bodies(page)
    page.click("#generate")
    expect(status(page)).to_contain_text(re.compile(r"\b[Jj]ob #2\b"))
    sent = bodies[0]
    assert (sent["prompt"], sent["seed"], sent["steps"], sent["scheduler"]) == (
        "a lighthouse in a storm",
        9876,
        3,
        "euler_a",
    )
    assert sent["loras"] == [{"name": "detail", "weight": 0.6}]
    # A1111's text: an installed model is chosen; what has no field here is named.
    paste_file(page, a1111_png(A1111_TEXT), "castle.png", "image/png")
    expect(note).to_contain_text(
        "Settings read from castle.png: prompt, negative prompt, seed, steps, size 64×72, "
        "guidance, sampler, model, VAE, clip skip."
    )
    expect(note).to_contain_text("Not used: Face restoration: CodeFormer (no such setting here).")
    expect(page.locator("#input-panel")).to_be_hidden()  # settings, not an input
    expect(page.locator("#model")).to_have_value("beta")
    expect(page.locator("#vae")).to_have_value("soft")
    expect(page.locator("#clip_skip")).to_have_value("2")
    expect(page.locator("#scheduler")).to_have_value("dpmpp_2m_karras")
    expect(page.locator("#height")).to_have_value("72")
    expect(page.locator("#lora-list li")).to_have_count(0)
    if device == "desktop":
        page.evaluate("window.scrollTo(0, 0)")
        shot(page, "png-settings-desktop", tmp_path)
    # It can still be the input instead, from the note.
    page.click("#read-note-input")
    expect(page.locator("#input-name")).to_have_text("castle.png · 64×72")
    page.click("#input-clear")
    # A model that is not installed: said, and the one chosen stays.
    missing = A1111_TEXT.replace("Model: beta", "Model: dreamshaper_8")
    drop_file(page, a1111_png(missing), "dream.png", "image/png")
    expect(note).to_contain_text(
        "Not used: the model dreamshaper_8 is not in the models folder (the one chosen stays)"
    )
    expect(page.locator("#model")).to_have_value("beta")
    # Plain messages, never silence: a PNG without settings, a file that is no PNG.
    plain = _plain_png()
    drop_file(page, plain, "plain.png", "image/png")
    expect(note).to_have_text(
        "plain.png carries no generation settings (no parameters from imagineerd, A1111 or "
        "ComfyUI): nothing was filled in."
    )
    drop_file(page, b"just some words", "notes.txt", "text/plain")
    expect(note).to_have_text(
        "notes.txt is not a PNG (it is a text/plain file): settings can be read from PNG "
        "images only."
    )
    drop_file(page, b"\x89PNG\r\n\x1a\n\x00\x00", "broken.png", "image/png")
    expect(note).to_contain_text("Could not read broken.png: the PNG is truncated")
    if device == "phone":
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        controls = [c for c in page.evaluate(CONTROLS) if c["what"].startswith("read-note")]
        assert controls and not [c for c in controls if c["width"] < 44 or c["height"] < 44]
    page.click("#read-note-close")
    expect(note).to_have_text("")
    # Pasted on Create without settings: the input image, as before, and it says so.
    paste_file(page, plain, "image.png", "image/png")
    expect(page.locator("#input-name")).to_have_text("image.png · 40×30")
    expect(note).to_have_text(
        "image.png carries no generation settings, so it is the input image now."
    )
    # Dropped on the input target: the input, whatever it carries.
    page.click("#input-clear")
    drop_file(page, ours, "lighthouse.png", "image/png", zone="#drop-input")
    expect(page.locator("#input-name")).to_have_text("lighthouse.png · 64×64")


def _plain_png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (40, 30), "orange").save(out, "PNG")
    return out.getvalue()


# -- live previews ------------------------------------------------------------------------
# Every preview the page showed (a short job's are on screen only for a moment on a CPU).
RECORD_PREVIEWS = """
window.__previews = [];
new MutationObserver(() => {
  for (const img of document.querySelectorAll("img.preview")) {
    const where = img.closest("#results") ? "results" : "running";
    const seen = `${where}: ${img.alt}`;
    const jpeg = img.getAttribute("src").startsWith("data:image/jpeg;base64,");
    if (jpeg && !window.__previews.includes(seen)) window.__previews.push(seen);
  }
}).observe(document,
  { subtree: true, childList: true, attributes: true, attributeFilter: ["src", "alt"] });
"""


def test_live_previews_show_in_the_running_cards(start_api, page: Page, device: str, tmp_path):
    api = start_api(previews={"every_steps": 1})
    page.add_init_script(RECORD_PREVIEWS)
    page.goto(api.url)
    page.fill("#prompt", "watch it appear")
    page.fill("#steps", "12")
    page.click("#generate")
    card = page.locator('#results > li[data-job="1"]')
    expect(card).to_have_attribute("data-status", "done", timeout=120000)
    seen = page.evaluate("window.__previews")
    steps = [
        int(m.group(1))
        for m in (re.match(r"results: Preview at step (\d+) of 12$", t) for t in seen)
        if m
    ]
    assert steps and all(1 <= n <= 12 for n in steps), seen
    # Done: the final image has taken the preview's place.
    expect(card.locator("img.preview")).to_have_count(0)
    image = card.locator(".result-thumb img")
    wait_for(lambda: image.evaluate("img => img.naturalWidth") == 64, 10)
    # A longer one, watched in the queue: the preview fills its frame, scaled up smoothly.
    submit_long(page, "a lighthouse on a cliff, storm clouds, oil painting")
    mid_run = page.locator('#results > li[data-job="2"] img.preview')
    expect(mid_run).to_have_attribute(
        "alt", re.compile(r"^Preview at step \d+ of 150$"), timeout=60000
    )
    if device == "desktop":
        shot(page, "preview-desktop", tmp_path)
        # Two more behind it, the queue paused: what Queue shows with a preview running.
        for prompt in ("a harbour at night, lanterns", "a fox in the snow, watercolour"):
            api("POST", "/api/generate", json={"prompt": prompt, "steps": 20})
        api("POST", "/api/queue/pause", json={})
    page.click("#tab-queue")
    preview = page.locator('#running .running-job[data-job="2"] .running-preview img')
    expect(preview).to_have_attribute(
        "alt", re.compile(r"^Preview at step \d+ of 150$"), timeout=60000
    )
    wait_for(lambda: preview.evaluate("img => img.complete && img.naturalWidth") > 0, 10)
    frame = box(page, '#running .running-job[data-job="2"] .running-preview')
    shown = box(page, '#running .running-job[data-job="2"] .running-preview img')
    assert shown["width"] == frame["width"] >= 72, (shown, frame)
    assert preview.evaluate("img => getComputedStyle(img).imageRendering") == "auto"
    if device == "desktop":
        expect(page.locator("#queued li")).to_have_count(2)
        expect(page.locator("#queue-paused")).to_contain_text("Queue paused")
        page.mouse.move(0, 0)
        shot(page, "queue-paused-desktop", tmp_path)
    # It keeps moving: a later step replaces it in the same element.
    before = preview.get_attribute("alt")
    expect(preview).not_to_have_attribute("alt", before or "", timeout=30000)
    page.locator('#running .running-job[data-job="2"]').get_by_role("button", name="Stop").click()
    expect(page.locator('#history li[data-job="2"] .state')).to_have_text("stopped", timeout=30000)
    expect(page.locator("#running img.preview")).to_have_count(0)


# -- failures are loud -----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_gone_and_back_is_told(make_config, page: Page):
    from imagineerd.daemon import Daemon
    from imagineerd.http.server import HttpService

    config = make_config(server={"port": _free_port()})
    started: list = []

    def serve(daemon: Daemon) -> HttpService:
        service = HttpService(daemon, config)
        service.start()
        started.append(service)
        return service

    first = Daemon(config)
    first.start()
    daemons = [first]
    try:
        service = serve(first)
        page.goto(service.url)
        submit_long(page, "outlives its server")
        card = page.locator('#results > li[data-job="1"]')
        expect(card).to_have_attribute("data-status", "running", timeout=30000)
        page.fill("#prompt", "waits its turn")
        page.fill("#steps", "2")
        page.fill("#width", "64")
        page.fill("#height", "64")
        page.click("#generate")
        expect(page.locator('#results > li[data-job="2"]')).to_have_attribute(
            "data-status", "queued"
        )
        service.stop()
        started.remove(service)
        banner = page.locator("#offline")
        expect(banner).to_be_visible(timeout=30000)
        expect(banner).to_contain_text("Server unreachable — reconnecting")
        expect(page.locator("body")).to_have_class(re.compile(r"\boffline\b"))
        assert card.evaluate("c => getComputedStyle(c).opacity") == "0.5"
        # Submitting now says why nothing happens, and sends nothing.
        bodies = _generate_bodies(page)
        page.fill("#prompt", "sent into the void")
        page.click("#generate")
        expect(status(page)).to_contain_text("The server is unreachable, so nothing was sent.")
        assert bodies == []
        # The whole server restarts: the running job goes back to the queue and runs again.
        first.stop()
        daemons.remove(first)
        second = Daemon(config)
        second.start()
        daemons.append(second)
        wait_for(lambda: second.job(1).status != "queued", 60)
        serve(second)
        expect(banner).to_be_hidden(timeout=30000)
        notice = page.locator("#notice")
        expect(notice).to_be_visible()
        expect(notice).to_contain_text("job #1 was interrupted and restarted")
        expect(page.locator("body")).not_to_have_class(re.compile(r"\boffline\b"))
        expect(card).to_have_attribute("data-status", "done", timeout=120000)
        expect(page.locator('#results > li[data-job="2"]')).to_have_attribute(
            "data-status", "done", timeout=120000
        )
        page.click("#generate")
        expect(status(page)).to_contain_text(re.compile(r"\b[Jj]ob #3\b"))
    finally:
        for service in reversed(started):
            service.stop()
        for daemon in reversed(daemons):
            daemon.stop()


def test_the_token_dialog_cannot_be_dismissed(start_api, page: Page):
    api = start_api(workers=False, server={"auth_token": "letmein"})
    page.goto(api.url)
    dialog = page.locator("#token-dialog")
    expect(dialog).to_be_visible()
    for _ in range(3):  # Chromium lets a second Esc close a modal unless it is reopened
        page.keyboard.press("Escape")
        expect(dialog).to_be_visible()
    page.evaluate("document.querySelector('#token-dialog').close()")
    expect(dialog).to_be_visible()
    expect(page.locator("#token-input")).to_be_focused()
    page.fill("#token-input", "letmein")
    page.click("#token-save")
    expect(dialog).to_be_hidden()
    page.fill("#prompt", "behind a token")
    page.click("#generate")
    expect(status(page)).to_have_text("Queued job #1.")


# -- accessibility: names, live regions, tap targets, both schemes -----------------------------
# Every visible control: its box (a checkbox counts with its label), and whether it has a
# name a screen reader can say.
CONTROLS = """() => {
  const shown = (el) => el.getClientRects().length > 0
    && getComputedStyle(el).visibility !== "hidden";
  const out = [];
  for (const el of document.querySelectorAll(
      "button, a[href], input:not([type=hidden]), select, textarea, summary, [role=tab]")) {
    if (!shown(el) || el.closest("dialog:not([open])")) continue;
    const target = el.type === "checkbox" && el.closest("label") ? el.closest("label") : el;
    const r = target.getBoundingClientRect();
    const labelled = Boolean(el.getAttribute("aria-label") || (el.labels && el.labels.length)
      || el.getAttribute("aria-labelledby") || el.textContent.trim() || el.title);
    const what = el.id || el.outerHTML.slice(0, 80);
    out.push({ what, width: r.width, height: r.height, labelled });
  }
  return out;
}"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_views_are_labelled_and_tappable(start_api, browser, device, scheme):
    api = start_api()
    api("POST", "/api/generate", json={"prompt": "for the lists", "seed": 1})
    assert api.wait_job(1)["status"] == "completed"
    context = new_context(browser, device, scheme)
    page = context.new_page()
    try:
        page.goto(api.url)
        page.fill("#prompt", "one of ours")
        page.click("#generate")
        expect(page.locator('#results > li[data-status="done"]')).to_have_count(1, timeout=120000)
        page.click("#prompt-history summary")
        for view in ("create", "queue", "gallery", "settings"):
            page.click(f"#tab-{view}")
            expect(page.locator(f"#view-{view}")).to_be_visible()
            page.wait_for_load_state("networkidle")
            controls = page.evaluate(CONTROLS)
            assert controls, view
            unnamed = [c["what"] for c in controls if not c["labelled"]]
            assert not unnamed, (view, unnamed)
            if device == "phone":
                small = [c for c in controls if c["width"] < 44 or c["height"] < 44]
                assert not small, (view, small)
                assert page.evaluate("document.documentElement.scrollWidth") <= 375, view
        page.click("#tab-gallery")
        page.locator("#gallery .thumb").first.click()
        expect(page.locator("#viewer")).to_be_visible()
        controls = [c for c in page.evaluate(CONTROLS)]
        assert not [c["what"] for c in controls if not c["labelled"]]
        if device == "phone":
            assert not [c for c in controls if c["width"] < 44 or c["height"] < 44]
        page.keyboard.press("Escape")
        assert page.get_attribute("#create-status", "role") == "status"
        assert page.get_attribute("#offline", "role") == "alert"
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert (background == "rgb(17, 20, 24)") == (scheme == "dark")
    finally:
        context.close()


# -- axe-core: no serious or critical violations in any view ---------------------------------
AXE_VERSION = "4.14.1"


@pytest.fixture(scope="session")
def axe_source() -> str:
    return load_axe()


def load_axe() -> str:
    """axe-core's script, a test-only asset: installed with npm (by name, pinned) into a
    cache folder outside the repository the first time, never served by imagineerd."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = cache / "imagineerd-tests" / f"axe-core-{AXE_VERSION}"
    script = folder / "node_modules" / "axe-core" / "axe.min.js"
    if not script.exists():
        npm = shutil.which("npm")
        result = (
            subprocess.run(
                [
                    npm,
                    "install",
                    "--no-save",
                    "--no-audit",
                    "--no-fund",
                    "--prefix",
                    str(folder),
                    f"axe-core@{AXE_VERSION}",
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if npm
            else None
        )
        if not script.exists():
            why = result.stderr.strip()[-500:] if result else "npm is not installed"
            message = f"could not install axe-core {AXE_VERSION} with npm: {why}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    return script.read_text()


AXE_RUN = """async () => {
  const result = await axe.run(document, { resultTypes: ["violations"] });
  return result.violations
    .filter((v) => v.impact === "serious" || v.impact === "critical")
    .map((v) => `${v.id} (${v.impact}): ${v.help} at ${v.nodes.slice(0, 3)
      .map((n) => n.target.join(" ")).join(", ")}`);
}"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_axe_finds_nothing_serious(start_api, browser, device, scheme, axe_source):
    api = start_api()
    api("POST", "/api/generate", json={"prompt": "for the lists", "seed": 1})
    assert api.wait_job(1)["status"] == "completed"
    context = new_context(browser, device, scheme)
    page = context.new_page()
    try:
        page.goto(api.url)
        page.fill("#prompt", "one of ours")
        page.click("#generate")
        expect(page.locator('#results > li[data-status="done"]')).to_have_count(1, timeout=120000)
        page.fill("#steps", "0")
        page.click("#generate")  # an error on show, too
        expect(page.locator('#create-form [data-error-for="steps"]')).not_to_have_text("")
        page.add_script_tag(content=axe_source)
        found: dict[str, list[str]] = {}
        for view in ("create", "queue", "gallery", "settings"):
            page.click(f"#tab-{view}")
            expect(page.locator(f"#view-{view}")).to_be_visible()
            page.wait_for_load_state("networkidle")
            found[view] = page.evaluate(AXE_RUN)
        page.click("#tab-gallery")
        page.locator("#gallery .thumb").first.click()
        expect(page.locator("#viewer")).to_be_visible()
        found["viewer"] = page.evaluate(AXE_RUN)
        assert not any(found.values()), found
    finally:
        context.close()


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_axe_and_tap_targets_in_the_queue_and_png_states(
    start_api, browser, device, scheme, axe_source
):
    """The states the steering and the PNG drop add: a paused queue with jobs to move, the
    drop overlay, and the note of what a PNG filled in."""
    api = start_api(workers=False)
    for n in (1, 2, 3):
        api("POST", "/api/generate", json={"prompt": f"job number {n}"})
    api("POST", "/api/queue/pause", json={})
    context = new_context(browser, device, scheme)
    page = context.new_page()
    try:
        page.goto(api.url + "/#queue")
        expect(page.locator("#queue-paused")).to_contain_text("Queue paused")
        expect(page.locator("#queued li")).to_have_count(3)
        page.add_script_tag(content=axe_source)
        found = {"queue": page.evaluate(AXE_RUN)}
        tappable = {"queue": page.evaluate(CONTROLS)}
        page.click("#tab-create")
        paste_file(page, a1111_png(A1111_TEXT), "castle.png", "image/png")
        expect(page.locator("#read-note-text")).to_contain_text("Settings read from castle.png")
        found["png note"] = page.evaluate(AXE_RUN)
        tappable["png note"] = page.evaluate(CONTROLS)
        transfer = page.evaluate_handle(MAKE_TRANSFER, [[1, 2, 3], "x.png", "image/png"])
        page.dispatch_event("main", "dragenter", {"dataTransfer": transfer})
        expect(page.locator("#drop-overlay")).to_be_visible()
        found["drop overlay"] = page.evaluate(AXE_RUN)
        page.dispatch_event("main", "dragleave", {"dataTransfer": transfer})
        expect(page.locator("#drop-overlay")).to_be_hidden()
        assert not any(found.values()), found
        for view, controls in tappable.items():
            assert not [c["what"] for c in controls if not c["labelled"]], view
            if device == "phone":
                small = [c for c in controls if c["width"] < 44 or c["height"] < 44]
                assert not small, (view, small)
                assert page.evaluate("document.documentElement.scrollWidth") <= 375
    finally:
        context.close()


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_axe_and_tap_targets_with_a_live_preview(start_api, browser, device, scheme, axe_source):
    api = start_api(previews={"every_steps": 1})
    context = new_context(browser, device, scheme)
    page = context.new_page()
    try:
        page.goto(api.url)
        submit_long(page, "a slow one")
        expect(page.locator("#results img.preview")).to_have_count(1, timeout=60000)
        page.add_script_tag(content=axe_source)
        found = {"create": page.evaluate(AXE_RUN)}
        controls = {"create": page.evaluate(CONTROLS)}
        page.click("#tab-queue")
        expect(page.locator("#running img.preview")).to_have_count(1, timeout=30000)
        found["queue"] = page.evaluate(AXE_RUN)
        controls["queue"] = page.evaluate(CONTROLS)
        assert not any(found.values()), found
        if device == "phone":
            for view, shown in controls.items():
                assert not [c for c in shown if c["width"] < 44 or c["height"] < 44], view
            assert page.evaluate("document.documentElement.scrollWidth") <= 375
        page.locator("#running .running-job").get_by_role("button", name="Stop").click()
        assert api.wait_job(1)["status"] == "cancelled"
    finally:
        context.close()
