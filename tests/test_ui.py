"""The web UI in a real Chromium (Debian's), driven by Playwright, against a real server.

.ci/run installs Debian's chromium; elsewhere the test is skipped when it is missing.
IMAGINEERD_SCREENSHOTS=1 writes the README's screenshots to docs/screenshots/.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
        raise RuntimeError("CI must install Debian's chromium (see .ci/run)")
    pytest.skip("chromium not installed (apt install chromium)", allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

from .conftest import Api, wait_for  # noqa: E402

SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
# The flags a closed network needs: no background calls to Google's services.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser) -> Page:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, errors  # no uncaught JavaScript errors in any test


def phone_context(browser, scheme: str):
    """A 375 px touch phone in the light or dark scheme."""
    return browser.new_context(
        viewport={"width": 375, "height": 740},
        is_mobile=True,
        has_touch=True,
        device_scale_factor=2,
        color_scheme=scheme,
    )


def shot(page: Page, name: str, tmp_path: Path) -> None:
    folder = SCREENSHOTS if os.environ.get("IMAGINEERD_SCREENSHOTS") else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=False)


def test_submit_watch_progress_and_see_the_image_in_the_gallery(start_api, page: Page, tmp_path):
    api: Api = start_api()
    page.goto(api.url)
    expect(page.locator("#steps")).to_have_value("2")  # defaults come from the server
    page.fill("#prompt", "a lighthouse at dusk")
    page.fill("#steps", "60")
    page.fill("#seed", "1234")
    page.locator("#prompt").press("Control+Enter")
    expect(page.locator("#create-status")).to_contain_text(re.compile(r"\b[Jj]ob #1\b"))
    # The job's card in Results, beside the form: its progress, then its image.
    bar = page.locator('#results [data-job="1"] .progress > div')
    expect(page.locator('#results [data-job="1"]')).to_be_visible(timeout=30000)
    # The bar moves: a width above 0 and below 100 while running.
    wait_for(lambda: 0 < _width(bar) < 100, 30)
    expect(page.locator('#results [data-job="1"] .progress-text')).to_contain_text("Step ")
    shot(page, "create-desktop", tmp_path)
    page.click("#tab-queue")
    expect(page.locator("#running .running-job")).to_be_visible()
    shot(page, "queue-desktop", tmp_path)
    expect(page.locator("#history .state.completed")).to_have_count(1, timeout=60000)
    page.click("#tab-gallery")
    thumbs = page.locator("#gallery .thumb img")
    expect(thumbs).to_have_count(1)
    wait_for(lambda: thumbs.first.evaluate("img => img.naturalWidth") > 0, 10)
    # A second job finishing appears without a reload.
    page.click("#tab-create")
    page.fill("#steps", "2")
    page.fill("#prompt", "a red fox")
    page.click("#generate")
    page.click("#tab-gallery")
    expect(thumbs).to_have_count(2, timeout=60000)
    thumbs.first.click()
    viewer = page.locator("#viewer")
    expect(viewer).to_be_visible()
    expect(viewer.locator("#viewer-meta")).to_contain_text("a red fox")
    shot(page, "gallery-viewer-desktop", tmp_path)
    page.click("#viewer-reuse")
    expect(page.locator("#prompt")).to_have_value("a red fox")
    page.click("#tab-gallery")
    thumbs.nth(1).click()
    expect(viewer.locator("#viewer-meta")).to_contain_text("1234")
    page.click("#viewer-reuse")
    expect(page.locator("#seed")).to_have_value("1234")
    expect(page.locator("#steps")).to_have_value("60")


def _width(locator) -> float:
    return locator.evaluate("d => parseFloat(d.style.width) || 0")


def test_every_job_of_a_running_batch_has_its_own_card(start_api, page: Page):
    # No worker yet: the three copies are all queued before one starts, so they run as
    # one batch rather than one, then two.
    api = start_api(workers=False, performance={"max_batch": 3})
    page.goto(api.url + "/#create")
    page.fill("#prompt", "three at once")
    page.fill("#steps", "150")
    page.fill("#copies", "3")
    page.click("#generate")
    expect(page.locator("#create-status")).to_contain_text("Queued 3 jobs")
    page.click("#tab-queue")
    api.daemon.start()  # now with its worker
    cards = page.locator("#running .running-job")
    expect(cards).to_have_count(3, timeout=30000)
    expect(page.locator("#queue-count")).to_have_text("3")
    # Each card follows its own job's progress events.
    for i in range(3):
        wait_for(lambda i=i: _width(cards.nth(i).locator(".progress > div")) > 0, 30)
    stopped = cards.nth(1).get_attribute("data-job")
    cards.nth(1).get_by_role("button", name="Stop").click()
    expect(page.locator(f'#history li[data-job="{stopped}"] .state.stopped')).to_be_visible(
        timeout=30000
    )
    expect(page.locator(f'#running .running-job[data-job="{stopped}"]')).to_have_count(0)
    expect(page.locator("#history .state.completed")).to_have_count(2, timeout=180000)
    expect(cards).to_have_count(0)


def test_validation_error_shows_next_to_its_field(start_api, page: Page):
    api = start_api(workers=False)
    page.goto(api.url)
    page.fill("#prompt", "x")
    page.fill("#width", "100")
    page.click("#generate")
    error = page.locator('#create-form [data-error-for="width"]')
    expect(error).to_have_text("Width must be a multiple of 8 (try 96 or 104)")
    expect(page.locator("#width")).to_be_focused()
    assert api.daemon.store.counts()["queued"] == 0
    page.fill("#width", "96")
    expect(error).to_have_text("")
    page.fill("#prompt", "")
    page.click("#generate")
    expect(page.locator('#create-form [data-error-for="prompt"]')).to_contain_text(
        "The prompt is empty"
    )


def test_cancel_a_queued_job_and_copies_get_their_own_seeds(start_api, page: Page):
    api = start_api(workers=False)  # nothing runs, so the jobs stay queued
    page.goto(api.url + "/#create")
    page.fill("#prompt", "many")
    page.fill("#seed", "10")
    page.fill("#copies", "3")
    page.click("#generate")
    expect(page.locator("#create-status")).to_contain_text("Queued 3 jobs")
    assert [j.spec.seed for j in api.daemon.store.queued()] == [10, 11, 12]
    page.click("#tab-queue")
    rows = page.locator("#queued li")
    expect(rows).to_have_count(3)
    rows.nth(1).get_by_role("button", name="Cancel job 2").click()
    expect(rows).to_have_count(2)
    assert api.daemon.job(2).status == "cancelled"
    # Another client adds a job: it appears live; a reload shows the true state too.
    api("POST", "/api/generate", json={"prompt": "from a script"})
    expect(rows).to_have_count(3)
    page.reload()
    expect(page.locator("#queued li")).to_have_count(3)
    expect(page.locator("#queued li").last).to_contain_text("from a script")


def test_settings_change_is_used_by_the_next_job(start_api, page: Page, tmp_path):
    api = start_api(workers=False)
    page.goto(api.url + "/#settings")
    expect(page.locator("#set-steps")).to_have_value("2")
    expect(page.locator("#config-view")).to_contain_text("server.port")
    shot(page, "settings-desktop", tmp_path)
    page.fill("#set-steps", "200")
    page.click("#settings-save")
    expect(page.locator('#settings-form [data-error-for="steps"]')).to_contain_text("from 1 to 150")
    page.fill("#set-steps", "7")
    page.select_option("#set-scheduler", "dpmpp_2m_karras")
    page.click("#settings-save")
    expect(page.locator("#settings-status")).to_contain_text("Configuration saved")
    page.click("#tab-create")
    expect(page.locator("#steps")).to_have_value("7")
    page.fill("#prompt", "uses the new default")
    page.click("#generate")
    expect(page.locator("#create-status")).to_contain_text("Queued job")
    job = api.daemon.store.queued()[0]
    assert (job.spec.steps, job.spec.scheduler) == (7, "dpmpp_2m_karras")


def test_token_prompt_when_auth_is_on(start_api, page: Page):
    from PIL import Image

    api = start_api(workers=False, server={"auth_token": "letmein"})
    Image.new("RGB", (64, 64), "orange").save(api.daemon.outputs_dir / "a.png")
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    # What an earlier version left behind is wiped on the next visit.
    page.context.add_init_script("localStorage.setItem('imagineerd.token', 'letmein')")
    page.goto(api.url)
    dialog = page.locator("#token-dialog")
    expect(dialog).to_be_visible()
    page.fill("#token-input", "wrong")
    page.click("#token-save")
    expect(page.locator("#token-error")).to_have_text("That token was not accepted.")
    page.fill("#token-input", "letmein")
    page.click("#token-save")
    expect(dialog).to_be_hidden()
    expect(page.locator("#steps")).to_have_value("2")
    expect(page.locator("#connection")).to_have_class("connection live")
    # Images and the event stream ride on the HttpOnly session cookie: no token in any URL,
    # nothing in the page's storage, nothing a script on the page can read.
    page.click("#tab-gallery")
    image = page.locator("#gallery .thumb img")
    wait_for(lambda: image.first.evaluate("img => img.naturalWidth") > 0, 10)
    assert not [u for u in urls if "token" in u], urls
    assert page.evaluate("JSON.stringify(localStorage)") == "{}"
    assert "letmein" not in page.evaluate("document.cookie")
    page.reload()  # still logged in: no second prompt
    expect(page.locator("#steps")).to_have_value("2")
    expect(dialog).to_be_hidden()
    page.click("#logout")
    expect(dialog).to_be_visible()


def test_input_bounds_come_from_the_server(start_api, page: Page, monkeypatch):
    from imagineerd import jobs

    served = jobs.limits()
    served["steps"] = {"min": 2, "max": 99}
    served["width"] = {"min": 128, "max": 1024, "multiple_of": 64}
    monkeypatch.setattr(jobs, "limits", lambda: served)
    api = start_api(workers=False)
    page.goto(api.url)
    expect(page.locator("#steps")).to_have_attribute("max", "99")
    for selector in ("#steps", "#set-steps"):
        steps = page.locator(selector)
        assert (steps.get_attribute("min"), steps.get_attribute("max")) == ("2", "99")
    width = page.locator("#width")
    assert [width.get_attribute(a) for a in ("min", "max", "step")] == ["128", "1024", "64"]
    seed = page.locator("#seed")
    assert seed.get_attribute("max") == str(served["seed"]["max"])


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_phone_layout_has_no_horizontal_scroll(start_api, browser, tmp_path, scheme):
    api = start_api()
    api("POST", "/api/generate", json={"prompt": "phone " * 40, "seed": 1})
    api.wait_job(1)
    context = phone_context(browser, scheme)
    page = context.new_page()
    try:
        for view in ("create", "queue", "gallery", "settings"):
            page.goto(f"{api.url}/#{view}")
            page.wait_for_load_state("networkidle")
            assert page.evaluate("document.documentElement.scrollWidth") <= 375, view
            if scheme == "light" and view in ("create", "gallery"):
                shot(page, f"{view}-phone", tmp_path)
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert (background == "rgb(17, 20, 24)") == (scheme == "dark")
    finally:
        context.close()


def test_keyboard_moves_between_tabs(start_api, page: Page):
    api = start_api(workers=False)
    page.goto(api.url)
    page.focus("#tab-create")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-queue")).to_be_focused()
    expect(page.locator("#view-queue")).to_be_visible()
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#view-settings")).to_be_visible()


# -- models: the picker, LoRAs, model switches, the first-run banner ------------------------
@pytest.fixture(scope="module")
def ui_models(tmp_path_factory) -> Path:
    """Two tiny single-file SD1.5 checkpoints, a LoRA and a VAE for them, and an SDXL LoRA
    and VAE (never offered with those), made once for the module."""
    from imagineerd.backends.test_files import make_test_checkpoint, make_test_lora, make_test_vae

    models = tmp_path_factory.mktemp("ui-models")
    make_test_checkpoint(models / "checkpoints" / "alpha.safetensors", arch="sd15", seed=1)
    make_test_checkpoint(models / "checkpoints" / "beta.safetensors", arch="sd15", seed=2)
    make_test_lora(models / "loras" / "detail.safetensors", arch="sd15")
    make_test_lora(models / "loras" / "xl-style.safetensors", arch="sdxl")
    make_test_vae(models / "vae" / "soft.safetensors", arch="sd15")
    make_test_vae(models / "vae" / "xl-vae.safetensors", arch="sdxl")
    return models


@pytest.fixture
def models_folder(ui_models: Path, tmp_path: Path) -> Path:
    """A models folder of this test's own (a test may add files to it)."""
    return Path(shutil.copytree(ui_models, tmp_path / "models"))


# Everything the running area showed, in order: a model switch lasts only a moment on a CPU.
RECORD_RUNNING = """
window.__shown = [];
new MutationObserver(() => {
  const text = document.querySelector("#create-running")?.textContent;
  if (text && window.__shown.at(-1) !== text) window.__shown.push(text);
}).observe(document, { subtree: true, childList: true, characterData: true });
"""


def test_choose_a_model_and_a_lora(start_api, page: Page, models_folder: Path, tmp_path):
    api = start_api(paths={"models": str(models_folder)}, model={"name": "alpha"})
    page.add_init_script(RECORD_RUNNING)
    page.goto(api.url)
    expect(page.locator("#model option")).to_have_text(["alpha · SD1.5 (default)", "beta · SD1.5"])
    expect(page.locator("#model")).to_have_value("")  # the default, sent as no model at all
    expect(page.locator("#clip_skip")).to_have_value("1")  # generation.clip_skip
    # Only what is made for SD1.5 (the models' architecture) is offered.
    expect(page.locator("#lora-add option")).to_have_text(["Add a LoRA…", "detail · SD1.5"])
    expect(page.locator("#vae option")).to_have_text(["Default (the model's own)", "soft · SD1.5"])
    page.select_option("#model", "beta")
    page.select_option("#lora-add", "detail")
    page.click("#lora-add-button")
    row = page.locator('#lora-list .lora-row[data-lora="detail"]')
    weight, slider = row.locator(".lora-weight"), row.locator("input[type=range]")
    expect(weight).to_be_focused()
    expect(weight).to_have_value("1")
    expect(page.locator("#lora-add option")).to_have_count(1)  # added: no longer offered
    # The server's bounds apply, and its message shows under the LoRAs.
    weight.fill("11")
    expect(slider).to_have_value("2")  # the slider stops at 2, the number goes on
    page.fill("#prompt", "a fox, detailed")
    page.click("#generate")
    error = page.locator('#create-form [data-error-for="loras"]')
    expect(error).to_have_text("The weight of detail must be from -10 to 10")
    expect(weight).to_be_focused()
    slider.fill("0.8")  # dragged
    expect(weight).to_have_value("0.8")
    expect(error).to_have_text("")
    page.click("#advanced summary")
    page.fill("#clip_skip", "2")
    page.select_option("#vae", "soft")
    page.screenshot(path=str(tmp_path / "create-models-desktop.png"))
    page.click("#generate")
    expect(page.locator("#create-status")).to_contain_text(re.compile(r"\b[Jj]ob #1\b"))
    job = api.wait_job(1, timeout=120)
    assert job["status"] == "completed", job
    assert job["model"] == "beta"
    assert job["loras"] == [{"name": "detail", "weight": 0.8}]
    assert (job["clip_skip"], job["vae"]) == (2, "soft")
    # The switch to beta showed while it happened, and is gone now.
    wait_for(lambda: any("Loading model beta…" in t for t in page.evaluate("window.__shown")), 10)
    expect(page.locator("#create-running")).to_be_hidden()
    page.click("#tab-queue")
    expect(page.locator('#history li[data-job="1"]')).to_contain_text(
        "beta + detail 0.8 + VAE soft"
    )
    # A job on the default model does not name it.
    api("POST", "/api/generate", json={"prompt": "plain", "seed": 5})
    expect(page.locator('#history li[data-job="2"] .state.completed')).to_be_visible(timeout=60000)
    assert "alpha" not in page.locator('#history li[data-job="2"]').inner_text()
    # Use these settings brings the model, the LoRA and clip skip back.
    page.click("#tab-create")
    page.select_option("#model", "")
    page.click('#lora-list [aria-label="Remove detail"]')
    expect(page.locator("#lora-list .lora-row")).to_have_count(0)
    page.fill("#clip_skip", "1")
    page.select_option("#vae", "default")
    page.click("#tab-gallery")
    page.locator('#gallery .thumb[data-file*="_1.png"]').click()
    expect(page.locator("#viewer-meta")).to_contain_text("detail 0.8")
    page.click("#viewer-reuse")
    expect(page.locator("#model")).to_have_value("beta")
    expect(row.locator(".lora-weight")).to_have_value("0.8")
    expect(page.locator("#clip_skip")).to_have_value("2")
    expect(page.locator("#vae")).to_have_value("soft")


def test_new_files_show_after_a_refresh_and_a_failed_switch_says_why(
    start_api, page: Page, models_folder: Path
):
    api = start_api(paths={"models": str(models_folder)}, model={"name": "alpha"})
    page.goto(api.url)
    expect(page.locator("#lora-add option")).to_have_text(["Add a LoRA…", "detail · SD1.5"])
    shutil.copy(
        models_folder / "loras" / "detail.safetensors",
        models_folder / "loras" / "style.safetensors",
    )
    # A file whose header is damaged is listed (of unknown architecture) but cannot load.
    (models_folder / "checkpoints" / "broken.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"a": 1}       ' + b"x" * 64
    )
    page.click("#models-refresh")
    expect(page.locator("#lora-add option")).to_have_text(
        ["Add a LoRA…", "detail · SD1.5", "style · SD1.5"]
    )
    expect(page.locator("#model option")).to_have_text(
        ["alpha · SD1.5 (default)", "beta · SD1.5", "broken"]
    )
    page.select_option("#model", "broken")
    page.fill("#prompt", "never")
    page.click("#generate")
    expect(page.locator("#create-status")).to_contain_text(re.compile(r"\b[Jj]ob #1\b"))
    failed = page.locator("#create-running .model-status.failed")
    expect(failed).to_contain_text("Could not load model broken: ", timeout=60000)
    assert api.wait_job(1)["status"] == "failed"
    failed.get_by_role("button", name="Dismiss").click()
    expect(page.locator("#create-running")).to_be_hidden()


def test_first_run_banner_when_the_default_model_cannot_be_loaded(
    start_api, page: Page, ui_models: Path, tmp_path: Path, monkeypatch
):
    # A fresh install without network: model.name is a hub id that is not in the cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = tmp_path / "models"
    models.mkdir()
    api = start_api(paths={"models": str(models)}, model={"name": "nobody/missing-model"})
    page.goto(api.url)
    banner = page.locator("#first-run")
    expect(banner).to_be_visible(timeout=60000)
    error = api("GET", "/api/health").json()["backend"]["error"]
    assert "nobody/missing-model" in error
    expect(page.locator("#first-run-error")).to_have_text(error)
    expect(banner).to_contain_text("The default model nobody/missing-model cannot be loaded.")
    expect(banner).to_contain_text("checkpoints/")
    expect(banner).to_contain_text("imagineerd pull REPO_ID")
    expect(banner).to_contain_text("model.name")
    expect(page.locator("#model option")).to_have_text(["nobody/missing-model (default)"])
    expect(page.locator("#lora-none")).to_contain_text("No LoRAs in the models folder")
    # As the banner says: a checkpoint into checkpoints/, ↻, choose it, and jobs run.
    (models / "checkpoints").mkdir()
    shutil.copy(ui_models / "checkpoints" / "alpha.safetensors", models / "checkpoints")
    page.click("#models-refresh")
    page.select_option("#model", "alpha")
    page.fill("#prompt", "first image")
    page.click("#generate")
    expect(page.locator("#create-status")).to_contain_text(re.compile(r"\b[Jj]ob #1\b"))
    assert api.wait_job(1, timeout=120)["status"] == "completed"
    expect(banner).to_be_visible()  # the default still cannot be loaded


def test_first_run_banner_goes_when_the_default_model_arrives(
    start_api, page: Page, ui_models: Path, tmp_path: Path, monkeypatch
):
    # model.name names a checkpoint that is not there yet (nor in the hub's cache).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    api = start_api(paths={"models": str(models)}, model={"name": "alpha"})
    page.goto(api.url)
    banner = page.locator("#first-run")
    expect(banner).to_be_visible(timeout=60000)
    expect(page.locator("#first-run-error")).to_contain_text("could not load model 'alpha'")
    shutil.copy(ui_models / "checkpoints" / "alpha.safetensors", models / "checkpoints")
    page.click("#models-refresh")
    expect(page.locator("#model option")).to_have_text(["alpha · SD1.5 (default)"])
    page.fill("#prompt", "now it loads")
    page.click("#generate")  # the default model, loaded again for this job: now it is there
    expect(banner).to_be_hidden(timeout=60000)
    assert api.wait_job(1, timeout=120)["status"] == "completed"
    assert api("GET", "/api/health").json()["backend"]["state"] == "ready"
    page.reload()
    expect(page.locator("#connection")).to_have_class("connection live")
    expect(banner).to_be_hidden()


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_phone_layout_with_models_and_the_banner(
    start_api, browser, models_folder, tmp_path, monkeypatch, scheme
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    api = start_api(paths={"models": str(models_folder)}, model={"name": "nobody/missing-model"})
    context = phone_context(browser, scheme)
    page = context.new_page()
    try:
        page.goto(api.url)
        expect(page.locator("#first-run")).to_be_visible(timeout=60000)
        page.select_option("#lora-add", "detail")
        page.click("#lora-add-button")
        page.locator("#lora-list .lora-weight").fill("-1.25")
        expect(page.locator("#lora-list input[type=range]")).to_have_value("-1.25")
        page.click("#advanced summary")
        page.wait_for_load_state("networkidle")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        page.screenshot(path=str(tmp_path / f"create-models-phone-{scheme}.png"), full_page=True)
    finally:
        context.close()


# -- image inputs: image to image, the mask brush, "Use as input", hires fix ---------------
def _input_png(path: Path, size: tuple[int, int] = (66, 50)) -> Path:
    """A small picture to start from: sky, sun and hills (rounds to 64x48 at 66x50)."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for y in range(height):
        t = y / max(1, height - 1)
        draw.line(
            [(0, y), (width, y)], fill=(int(70 + 150 * t), int(120 + 80 * t), int(230 - 60 * t))
        )
    r = height // 6
    draw.ellipse(
        [width * 0.68 - r, height * 0.3 - r, width * 0.68 + r, height * 0.3 + r],
        fill=(255, 214, 90),
    )
    draw.polygon(
        [
            (0, height),
            (0, height * 0.7),
            (width * 0.3, height * 0.5),
            (width * 0.6, height * 0.72),
            (width * 0.85, height * 0.58),
            (width, height * 0.66),
            (width, height),
        ],
        fill=(52, 110, 64),
    )
    image.save(path)
    return path


def _generate_bodies(page: Page) -> list[dict]:
    """The bodies of the page's POST /api/generate requests, as they are sent."""
    bodies: list[dict] = []

    def record(request) -> None:
        if request.method == "POST" and request.url.endswith("/api/generate"):
            bodies.append(request.post_data_json)

    page.on("request", record)
    return bodies


def _data_url_image(url: str):
    import base64
    import io

    from PIL import Image

    assert url.startswith("data:image/png;base64,"), url[:40]
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def _paint(page: Page, points: list[tuple[float, float]]) -> None:
    """A stroke with the mouse through points given as fractions of the mask canvas."""
    box = page.locator("#mask-canvas").bounding_box()
    assert box
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y, steps=6)
    page.mouse.up()


def test_image_to_image_with_a_painted_mask(start_api, page: Page, tmp_path):
    api = start_api()
    picture = _input_png(tmp_path / "input.png", (130, 98))  # shown as 128x96
    bodies = _generate_bodies(page)
    page.goto(api.url)
    expect(page.locator("#hires-field")).to_be_visible()  # text to image: hires fix offered
    expect(page.locator("#img2img-options")).to_be_hidden()
    page.set_input_files("#input-file", str(picture))
    expect(page.locator("#input-preview")).to_be_visible()
    expect(page.locator("#input-name")).to_have_text("input.png · 130×98")
    # The size fields take the input's size rounded to 8; hires fix is for text to image.
    expect(page.locator("#width")).to_have_value("128")
    expect(page.locator("#height")).to_have_value("96")
    expect(page.locator("#hires-field")).to_be_hidden()
    expect(page.locator("#input-mode")).to_have_text("img2img")
    page.locator("#strength").fill("0.6")
    expect(page.locator("#strength-value")).to_have_text("0.6")
    # A stroke over the sun, at the image's own pixels: the mask is the input's size.
    _paint(page, [(0.55, 0.2), (0.68, 0.3), (0.8, 0.38)])
    expect(page.locator("#input-mode")).to_have_text("inpaint")
    page.fill("#mask_blur", "2")
    page.select_option("#inpaint_area", "masked")
    page.fill("#prompt", "a lighthouse on the hill")
    page.fill("#steps", "40")
    page.click("#generate")
    expect(page.locator("#create-status")).to_contain_text(re.compile(r"\b[Jj]ob #1\b"))
    # Inpainting in progress: the input with its painted mask, the job's progress beside it.
    bar = page.locator("#results .progress > div")
    expect(page.locator("#results")).to_contain_text("inpaint", timeout=30000)
    wait_for(lambda: 0 < _width(bar) < 100, 60)
    page.mouse.move(0, 0)
    page.evaluate("window.scrollTo(0, 0)")
    shot(page, "inpaint-desktop", tmp_path)
    job = api.wait_job(1, timeout=180)
    assert job["status"] == "completed", job
    assert job["init_image"].startswith("sha256:") and job["mask"].startswith("sha256:"), job
    assert (job["strength"], job["mask_blur"], job["inpaint_area"]) == (0.6, 2, "masked")
    assert (job["init_image_name"], job["hires"]) == ("", None)
    assert (job["width"], job["height"]) == (128, 96)
    # What went out: the file itself, and the mask as a PNG of the input's natural size,
    # white where painted on black.
    body = bodies[0]
    assert body["init_image"].startswith("data:image/png;base64,")
    assert _data_url_image(body["init_image"]).size == (130, 98)
    mask = _data_url_image(body["mask"]).convert("L")
    assert mask.size == (130, 98)
    assert mask.getpixel((int(130 * 0.68), int(98 * 0.3))) == 255  # on the stroke
    assert mask.getpixel((5, 90)) == 0  # far from it
    assert "hires" not in body
    page.click("#tab-queue")
    expect(page.locator('#history li[data-job="1"]')).to_contain_text("128×96 · inpaint")
    # Erase it all: no mask goes out, the job is image to image.
    page.click("#tab-create")
    page.click("#mask-erase")
    page.fill("#brush-size", "120")
    _paint(page, [(0.3, 0.1), (0.99, 0.3), (0.5, 0.5), (0.99, 0.5)])
    page.click("#mask-clear")
    expect(page.locator("#input-mode")).to_have_text("img2img")
    page.fill("#steps", "2")
    page.click("#generate")
    expect(page.locator("#create-status")).to_contain_text(re.compile(r"\b[Jj]ob #2\b"))
    assert "mask" not in bodies[1] and bodies[1]["strength"] == 0.6
    job = api.wait_job(2, timeout=120)
    assert job["status"] == "completed", job
    assert (job["mask"], job["init_image"]) == ("", api.wait_job(1)["init_image"])
    page.click("#tab-queue")
    expect(page.locator('#history li[data-job="2"]')).to_contain_text("img2img")
    # × goes back to text to image, with the size fields as they were.
    page.click("#tab-create")
    page.click("#input-clear")
    expect(page.locator("#input-panel")).to_be_hidden()
    expect(page.locator("#hires-field")).to_be_visible()
    expect(page.locator("#width")).to_have_value("64")
    expect(page.locator("#height")).to_have_value("64")
    expect(page.locator("#input-pick")).to_be_focused()


def test_use_an_output_as_input_and_reuse_its_settings(start_api, page: Page):
    api = start_api()
    api("POST", "/api/generate", json={"prompt": "the first one", "seed": 7})
    assert api.wait_job(1)["status"] == "completed"
    name = api("GET", "/api/outputs").json()["outputs"][0]["filename"]
    bodies = _generate_bodies(page)
    page.goto(api.url + "/#gallery")
    page.locator(f'#gallery .thumb[data-file="{name}"]').click()
    page.click("#viewer-input")
    expect(page.locator("#view-create")).to_be_visible()
    expect(page.locator("#input-preview")).to_have_attribute("src", f"/api/outputs/{name}")
    expect(page.locator("#input-name")).to_have_text(f"{name} · 64×64")
    expect(page.locator("#hires-field")).to_be_hidden()
    page.locator("#strength").fill("0.35")
    page.fill("#steps", "4")  # 0.35 of 4 steps: one step of image to image
    page.fill("#prompt", "the first one, again")
    page.click("#generate")
    expect(page.locator("#create-status")).to_contain_text(re.compile(r"\b[Jj]ob #2\b"))
    assert bodies[0]["init_image"] == name and "mask" not in bodies[0]
    job = api.wait_job(2)
    assert job["status"] == "completed", job
    assert (job["init_image_name"], job["strength"], job["mask"]) == (name, 0.35, "")
    assert job["init_image"].startswith("sha256:")
    # Its image says so, and "Use these settings" brings the input back by its name.
    page.locator("#strength").fill("0.9")
    page.click("#input-clear")
    page.click("#tab-gallery")
    second = page.locator('#gallery .thumb[data-file*="_2.png"]')
    second.click()
    expect(page.locator("#viewer-meta")).to_contain_text("img2img")
    expect(page.locator("#viewer-meta")).to_contain_text(name)
    page.click("#viewer-reuse")
    expect(page.locator("#prompt")).to_have_value("the first one, again")
    expect(page.locator("#input-preview")).to_have_attribute("src", f"/api/outputs/{name}")
    expect(page.locator("#strength")).to_have_value("0.35")
    expect(page.locator("#strength-value")).to_have_text("0.35")
    page.click("#generate")
    expect(page.locator("#create-status")).to_contain_text(re.compile(r"\b[Jj]ob #3\b"))
    assert bodies[1]["init_image"] == name and bodies[1]["strength"] == 0.35
    # The output is gone: the server's message shows under the input.
    assert api.wait_job(3)["status"] == "completed"
    (api.daemon.outputs_dir / name).unlink()
    page.click("#generate")
    error = page.locator('#create-form [data-error-for="init_image"]')
    expect(error).to_contain_text("init_image")
    expect(page.locator("#input-clear")).to_be_focused()


def test_hires_fix_for_text_to_image(start_api, page: Page):
    api = start_api()
    bodies = _generate_bodies(page)
    page.goto(api.url)
    expect(page.locator("#hires-options")).to_be_hidden()
    page.check("#hires")
    expect(page.locator("#hires-options")).to_be_visible()
    expect(page.locator("#hires-size")).to_have_text("→ 128×128")
    page.fill("#hires-scale", "1.5")
    expect(page.locator("#hires-size")).to_have_text("→ 96×96")
    page.locator("#hires-denoising_strength").fill("0.4")
    expect(page.locator("#hires-denoising-value")).to_have_text("0.4")
    page.select_option("#hires-upscaler", "lanczos")
    page.fill("#prompt", "a fox, larger")
    page.click("#generate")
    expect(page.locator("#create-status")).to_contain_text(re.compile(r"\b[Jj]ob #1\b"))
    assert bodies[0]["hires"] == {
        "scale": 1.5,
        "steps": 0,
        "denoising_strength": 0.4,
        "upscaler": "lanczos",
    }
    job = api.wait_job(1, timeout=120)
    assert job["status"] == "completed", job
    assert job["hires"] == {
        "scale": 1.5,
        "steps": 0,
        "denoising_strength": 0.4,
        "upscaler": "lanczos",
    }
    assert job["init_image"] == ""
    page.click("#tab-queue")
    expect(page.locator('#history li[data-job="1"]')).to_contain_text("hires ×1.5")
    # The server's bound for the final size shows under the hires fix, its input focused.
    page.click("#tab-create")
    page.fill("#width", "2048")
    page.fill("#hires-scale", "2")
    expect(page.locator("#hires-size")).to_contain_text("over 2048")
    page.click("#generate")
    expect(page.locator('#create-form [data-error-for="hires"]')).to_contain_text("2048")
    # Use these settings: the job's own size and its hires fix.
    page.fill("#width", "64")
    page.uncheck("#hires")
    page.click("#tab-gallery")
    page.locator("#gallery .thumb").first.click()
    expect(page.locator("#viewer-meta")).to_contain_text("hires ×1.5")
    page.click("#viewer-reuse")
    expect(page.locator("#hires")).to_be_checked()
    expect(page.locator("#hires-scale")).to_have_value("1.5")
    expect(page.locator("#hires-upscaler")).to_have_value("lanczos")
    expect(page.locator("#width")).to_have_value("64")


def test_drop_or_paste_an_image_and_wrong_files(start_api, page: Page, tmp_path):
    api = start_api(workers=False)
    page.goto(api.url)
    picture = _input_png(tmp_path / "drop.png", (40, 200))
    payload = list(picture.read_bytes())
    make = """([bytes, name, type]) => {
      const data = new DataTransfer();
      data.items.add(new File([new Uint8Array(bytes)], name, { type }));
      return data;
    }"""
    data = page.evaluate_handle(make, [payload, "drop.png", "image/png"])
    page.dispatch_event("#input-drop", "drop", {"dataTransfer": data})
    expect(page.locator("#input-name")).to_have_text("drop.png · 40×200")
    expect(page.locator("#width")).to_have_value("64")  # 40 is below the smallest size
    expect(page.locator("#height")).to_have_value("200")
    page.click("#input-clear")
    # Pasted anywhere on the Create view (here into the prompt): it becomes the input.
    data = page.evaluate_handle(make, [payload, "image.png", "image/png"])
    page.focus("#prompt")
    page.evaluate(
        "data => document.activeElement.dispatchEvent("
        "new ClipboardEvent('paste', { clipboardData: data, bubbles: true }))",
        data,
    )
    expect(page.locator("#input-name")).to_have_text("image.png · 40×200")
    page.click("#input-clear")
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    page.set_input_files("#input-file", str(text))
    expect(page.locator('#create-form [data-error-for="init_image"]')).to_contain_text(
        "notes.txt is not a PNG, JPEG or WebP image"
    )
    expect(page.locator("#input-panel")).to_be_hidden()


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_phone_paints_a_mask_by_touch(start_api, browser, tmp_path, scheme):
    api = start_api(workers=False)
    picture = _input_png(tmp_path / "phone.png", (96, 128))
    context = phone_context(browser, scheme)
    page = context.new_page()
    try:
        page.goto(api.url)
        page.set_input_files("#input-file", str(picture))
        canvas = page.locator("#mask-canvas")
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()
        assert box and box["width"] <= 375
        # A finger drawn across the picture: touch events as a phone sends them.
        cdp = context.new_cdp_session(page)
        y = box["y"] + box["height"] / 2
        xs = [box["x"] + box["width"] * f for f in (0.2, 0.35, 0.5, 0.65, 0.8)]
        cdp.send(
            "Input.dispatchTouchEvent",
            {"type": "touchStart", "touchPoints": [{"x": xs[0], "y": y}]},
        )
        for x in xs[1:]:
            cdp.send(
                "Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y}]}
            )
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        expect(page.locator("#input-mode")).to_have_text("inpaint")
        # The stroke covers the line, at the image's own pixels, and the page did not scroll.
        painted = page.evaluate(
            """() => {
              const c = document.querySelector('#mask-canvas');
              const y = Math.round(c.height / 2);
              const row = c.getContext('2d').getImageData(0, y, c.width, 1).data;
              let n = 0;
              for (let i = 3; i < row.length; i += 4) if (row[i]) n++;
              return [c.width, c.height, n];
            }"""
        )
        assert painted[:2] == [96, 128]
        assert painted[2] >= 96 * 0.55, painted
        page.wait_for_load_state("networkidle")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        page.screenshot(path=str(tmp_path / f"inpaint-phone-{scheme}.png"), full_page=True)
    finally:
        context.close()
