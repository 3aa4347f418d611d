"""The gallery's management in a real Chromium (Debian's), on a laptop-sized window and on a
375 px touch phone, against a real server on the tiny model: favourites, the filter bar
paging through the server's filtered results, delete with Undo, select mode with Delete and
Download zip, and no token in any URL the page asks for.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from .conftest import Api, wait_for

# test_ui skips the module where Debian's chromium is missing (and fails in CI).
from .test_ui import ARGS, CHROMIUM, shot
from .test_ui_flows import AXE_RUN, CONTROLS, load_axe, new_context

DEVICES = ["desktop", "phone"]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def axe_source() -> str:
    return load_axe()


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def page(browser, device) -> Iterator[Page]:
    context = new_context(browser, device, locale="en-GB")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, errors  # no uncaught JavaScript errors in any test


def make_images(api: Api, prompts: list[str], **fields) -> list[dict]:
    """Jobs queued over the API, finished; their gallery entries, newest first."""
    ids = [
        api("POST", "/api/generate", json={"prompt": prompt, "seed": n, **fields}).json()["id"]
        for n, prompt in enumerate(prompts, start=1)
    ]
    for job_id in ids:
        assert api.wait_job(job_id, timeout=120)["status"] == "completed"
    return api("GET", f"/api/outputs?limit={len(ids)}").json()["outputs"]


def tiles(page: Page):
    return page.locator("#gallery .tile")


def tile_files(page: Page) -> list[str]:
    return page.evaluate(
        "() => [...document.querySelectorAll('#gallery .tile')].map(t => t.dataset.file)"
    )


def outputs_requests(page: Page) -> list[str]:
    """The query strings of every GET /api/outputs listing the page sends."""
    seen: list[str] = []

    def record(request) -> None:
        path = request.url.split("?", 1)
        if request.method == "GET" and path[0].endswith("/api/outputs"):
            seen.append(path[1] if len(path) > 1 else "")

    page.on("request", record)
    return seen


# -- favourites and the filter bar ---------------------------------------------------------
def test_filters_page_through_the_servers_results(start_api, page: Page, device: str, tmp_path):
    api = start_api()
    foxes = make_images(api, [f"a red fox number {n}" for n in range(30)])
    whales = []
    for n in range(3):
        made = api(
            "POST",
            "/api/generate",
            json={"prompt": f"a blue whale {n}", "width": 72, "seed": n},
            headers={"X-Imagineerd-Source": "ui"},
        ).json()
        assert api.wait_job(made["id"])["status"] == "completed"
        whales.append(made["id"])
    for entry in foxes[:2]:
        assert api("PATCH", f"/api/outputs/{entry['filename']}", json={"favourite": True}).ok
    asked = outputs_requests(page)
    page.goto(api.url + "/#gallery")
    wait_for(lambda: tiles(page).count() >= 24, 10)
    # Search: the server's filtered pages, one after the other as the page scrolls.
    page.fill("#filter-q", "FOX")
    expect(page.locator("#gallery-status")).to_contain_text("match “FOX”")
    for _ in range(10):
        if tiles(page).count() == 30:
            break
        page.locator("#gallery-more").scroll_into_view_if_needed()
        page.wait_for_timeout(200)
    expect(tiles(page)).to_have_count(30)
    assert all("fox" in f for f in tile_files(page))
    searched = [q for q in asked if "q=FOX" in q]
    assert any("before=" in q for q in searched), asked  # a second page, still filtered
    expect(page.locator("#gallery-status")).to_have_text("30 images match “FOX”.")
    page.fill("#filter-q", "")
    # Favourites only.
    page.click("#filter-favourite")
    expect(page.locator("#filter-favourite")).to_have_attribute("aria-pressed", "true")
    expect(tiles(page)).to_have_count(2)
    assert set(tile_files(page)) == {e["filename"] for e in foxes[:2]}
    page.click("#filter-favourite")
    # Model, source, size, dates: behind "Filters".
    page.click("#filter-more")
    expect(page.locator("#filter-more")).to_have_attribute("aria-expanded", "true")
    expect(page.locator("#filter-model option")).to_have_text(["Any model", "tiny-sd15"])
    page.select_option("#filter-source", "ui")
    expect(tiles(page)).to_have_count(3)
    assert all("whale" in f for f in tile_files(page))
    expect(page.locator("#filter-more")).to_have_text("Filters (1)")
    page.select_option("#filter-source", "")
    page.fill("#filter-width", "72")
    page.locator("#filter-width").press("Enter")
    expect(tiles(page)).to_have_count(3)
    page.fill("#filter-width", "")
    page.locator("#filter-width").press("Enter")
    page.select_option("#filter-model", "tiny-sd15")
    wait_for(lambda: tiles(page).count() >= 24, 10)
    if device == "desktop":  # both pages in sight: the second loads at once
        expect(page.locator("#gallery-status")).to_have_text("33 images match model tiny-sd15.")
        page.mouse.move(0, 0)
        page.evaluate("document.activeElement.blur()")
        shot(page, "gallery-filters-desktop", tmp_path)
    today = foxes[0]["created"][:10]
    page.fill("#filter-since", today)
    page.locator("#filter-since").dispatch_event("change")
    wait_for(lambda: any(f"since={today}" in q for q in asked), 10)
    wait_for(lambda: tiles(page).count() >= 24, 10)
    page.fill("#filter-until", "2001-01-01")
    page.locator("#filter-until").dispatch_event("change")
    expect(tiles(page)).to_have_count(0)
    empty = page.locator("#gallery-empty")
    expect(empty).to_contain_text("No image matches model tiny-sd15")
    expect(empty).to_contain_text(f"{today} to 2001-01-01")
    if device == "phone":
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        small = [c for c in page.evaluate(CONTROLS) if c["width"] < 44 or c["height"] < 44]
        assert not small, small
    page.click("#gallery-empty-clear")
    expect(page.locator("#filter-q")).to_be_focused()
    expect(page.locator("#filter-more")).to_have_text("Filters")
    wait_for(lambda: tiles(page).count() >= 24, 10)
    expect(page.locator("#gallery-status")).to_have_text("")


def test_favourite_from_a_tile_and_in_the_viewer(start_api, page: Page):
    api = start_api()
    entries = make_images(api, ["the first", "the second"])
    page.goto(api.url + "/#gallery")
    expect(tiles(page)).to_have_count(2)
    newest = entries[0]["filename"]
    star = page.locator(f'#gallery .tile[data-file="{newest}"] .tile-star')
    expect(star).to_have_attribute("aria-pressed", "false")
    expect(star).to_have_accessible_name("Favourite: the second")
    star.click()
    expect(star).to_have_attribute("aria-pressed", "true")
    listed = api("GET", "/api/outputs?favourite=true").json()["outputs"]
    assert [e["filename"] for e in listed] == [newest]
    # The viewer shows it, and F (or its star) changes it; the tile follows.
    page.locator(f'#gallery .thumb[data-file="{newest}"]').click()
    viewer_star = page.locator("#viewer-favourite")
    expect(viewer_star).to_have_attribute("aria-pressed", "true")
    page.keyboard.press("ArrowRight")
    expect(viewer_star).to_have_attribute("aria-pressed", "false")
    page.keyboard.press("f")
    expect(viewer_star).to_have_attribute("aria-pressed", "true")
    page.keyboard.press("ArrowLeft")
    viewer_star.click()
    expect(viewer_star).to_have_attribute("aria-pressed", "false")
    page.keyboard.press("Escape")
    expect(star).to_have_attribute("aria-pressed", "false")
    listed = api("GET", "/api/outputs?favourite=true").json()["outputs"]
    assert [e["filename"] for e in listed] == [entries[1]["filename"]]


def test_changes_made_elsewhere_show_in_an_open_gallery(start_api, page: Page, device: str):
    """A star, a delete and a restore made by another page or a script (the API) reach an
    open gallery over the event stream (output.favourite, output.trashed, output.restored)."""
    if device == "phone":
        pytest.skip("the same page logic on both; the layout is tested elsewhere")
    api = start_api()
    entries = make_images(api, ["kept", "starred elsewhere", "deleted elsewhere"])
    page.goto(api.url + "/#gallery")
    expect(tiles(page)).to_have_count(3)
    starred, deleted = entries[1]["filename"], entries[0]["filename"]
    star = page.locator(f'#gallery .tile[data-file="{starred}"] .tile-star')
    expect(star).to_have_attribute("aria-pressed", "false")
    assert api("PATCH", f"/api/outputs/{starred}", json={"favourite": True}).ok
    expect(star).to_have_attribute("aria-pressed", "true")
    assert api("DELETE", f"/api/outputs/{deleted}").ok
    expect(tiles(page)).to_have_count(2)
    assert deleted not in tile_files(page)
    assert api("POST", "/api/outputs/restore", json={"files": [deleted]}).json()["restored"]
    expect(tiles(page)).to_have_count(3)
    assert tile_files(page) == [e["filename"] for e in entries]  # back in its place


# -- delete with Undo, select mode -----------------------------------------------------------
def test_delete_from_a_tile_and_the_viewer_with_undo(start_api, page: Page, device: str):
    api = start_api()
    entries = make_images(api, ["one", "two", "three", "four"])
    names = [e["filename"] for e in entries]  # newest first: four, three, two, one
    page.goto(api.url + "/#gallery")
    expect(tiles(page)).to_have_count(4)
    second = page.locator(f'#gallery .tile[data-file="{names[1]}"]')
    second.locator(".tile-delete").click()
    expect(second).to_have_count(0)
    toast = page.locator("#toast")
    expect(page.locator("#toast-text")).to_have_text("Deleted 1 image.")
    # The focus goes to the next tile's Delete, not to nothing.
    expect(page.locator(f'#gallery .tile[data-file="{names[2]}"] .tile-delete')).to_be_focused()
    trashed = api("GET", "/api/trash").json()["trashed"]
    assert names[1] in str(trashed), trashed
    assert not (api.daemon.outputs_dir / names[1]).exists()
    if device == "phone":
        undo = page.locator("#toast-undo").bounding_box()
        assert undo and undo["width"] >= 44 and undo["height"] >= 44
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.click("#toast-undo")
    expect(page.locator("#toast-text")).to_have_text("Restored 1 image.")
    wait_for(lambda: tile_files(page) == names, 10)
    assert (api.daemon.outputs_dir / names[1]).exists()
    # In the viewer: Delete shows the next image; its toast is in the (modal) viewer.
    page.locator(f'#gallery .thumb[data-file="{names[0]}"]').click()
    viewer = page.locator("#viewer")
    expect(page.locator("#viewer-count")).to_have_text("1 of 4")
    page.click("#viewer-delete")
    expect(page.locator("#viewer-count")).to_have_text("1 of 3")
    expect(viewer).to_have_attribute("data-file", names[1])
    expect(page.locator("#viewer-delete")).to_be_focused()
    expect(toast).to_be_visible()
    expect(viewer.locator("#toast")).to_have_count(1)
    page.keyboard.press("Delete")  # the key does it too
    expect(viewer).to_have_attribute("data-file", names[2])
    expect(page.locator("#toast-text")).to_have_text("Deleted 1 image.")
    page.locator("#toast-undo").click()  # brings back the last one deleted
    expect(page.locator("#toast-text")).to_have_text("Restored 1 image.")
    page.keyboard.press("Escape")
    expect(viewer).to_be_hidden()
    expect(toast).to_be_visible()  # back on the page, still readable
    wait_for(lambda: tile_files(page) == names[1:], 10)
    # Ctrl+Z undoes a delete while its toast shows.
    page.locator(f'#gallery .tile[data-file="{names[3]}"] .tile-delete').click()
    expect(page.locator("#toast-text")).to_have_text("Deleted 1 image.")
    page.keyboard.press("Control+z")
    expect(page.locator("#toast-text")).to_have_text("Restored 1 image.")
    wait_for(lambda: tile_files(page) == names[1:], 10)


def test_select_several_then_download_a_zip_or_delete(start_api, page: Page, device: str):
    api = start_api()
    entries = make_images(api, ["alpha", "bravo", "charlie", "delta"])
    names = [e["filename"] for e in entries]
    page.goto(api.url + "/#gallery")
    expect(tiles(page)).to_have_count(4)
    page.click("#select-mode")
    expect(page.locator("#select-mode")).to_have_attribute("aria-pressed", "true")
    bar = page.locator("#select-bar")
    expect(bar).to_be_visible()
    expect(page.locator("#select-count")).to_have_text("Pick images to delete or download.")
    expect(page.locator("#select-delete")).to_be_disabled()
    expect(page.locator(".tile-star").first).to_be_hidden()  # no star nor Delete while picking
    for name in names[1:3]:
        page.locator(f'#gallery .thumb[data-file="{name}"]').click()
    expect(page.locator("#select-count")).to_have_text("2 selected")
    expect(page.locator(f'#gallery .thumb[data-file="{names[1]}"]')).to_have_attribute(
        "aria-pressed", "true"
    )
    expect(page.locator("#viewer")).to_be_hidden()  # picking opens nothing
    if device == "phone":
        small = [c for c in page.evaluate(CONTROLS) if c["width"] < 44 or c["height"] < 44]
        assert not small, small
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
    # The zip: a POST, fetched, then saved from an object URL (nothing with the token).
    with page.expect_download() as download_info:
        page.click("#select-zip")
    download = download_info.value
    assert download.url.startswith("blob:"), download.url
    assert download.suggested_filename == "imagineerd-images.zip"
    with zipfile.ZipFile(io.BytesIO(open(download.path(), "rb").read())) as archive:
        assert sorted(archive.namelist()) == sorted(names[1:3])
    expect(page.locator("#toast-text")).to_contain_text(
        "Downloading imagineerd-images.zip (2 images)"
    )
    page.click("#select-delete")
    expect(page.locator("#toast-text")).to_have_text("Deleted 2 images.")
    expect(tiles(page)).to_have_count(2)
    expect(page.locator("#select-count")).to_have_text("Pick images to delete or download.")
    assert sorted(tile_files(page)) == sorted([names[0], names[3]])
    page.click("#toast-undo")
    expect(page.locator("#toast-text")).to_have_text("Restored 2 images.")
    wait_for(lambda: tile_files(page) == names, 10)
    # Select all, then Esc leaves select mode, the tiles open the viewer again.
    page.click("#select-all")
    expect(page.locator("#select-count")).to_have_text("4 selected")
    page.locator("#gallery .thumb").first.focus()
    page.keyboard.press("Escape")
    expect(bar).to_be_hidden()
    expect(page.locator("#select-mode")).to_be_focused()
    assert page.locator("#gallery .thumb[aria-pressed]").count() == 0
    page.locator("#gallery .thumb").first.click()
    expect(page.locator("#viewer")).to_be_visible()


# -- the token never lands in a URL ------------------------------------------------------------
def test_no_request_url_carries_the_token(start_api, browser):
    """With a token, the main flows (create, gallery thumbnails, the viewer, the event
    stream, a zip download) ride on the session cookie: no URL the browser asks for holds
    the token."""
    token = "s3cret-t0ken-value"
    api = start_api(server={"auth_token": token})
    context = new_context(browser, "desktop")
    page = context.new_page()
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    page.on("download", lambda download: urls.append(download.url))
    try:
        page.goto(api.url)
        page.fill("#token-input", token)
        page.click("#token-save")
        expect(page.locator("#token-dialog")).to_be_hidden()
        expect(page.locator("#connection")).to_have_class("connection live")
        page.fill("#prompt", "behind a token")
        page.click("#generate")
        card = page.locator('#results > li[data-job="1"]')
        expect(card).to_have_attribute("data-status", "done", timeout=120000)
        image = card.locator(".result-thumb img")
        wait_for(lambda: image.evaluate("img => img.naturalWidth") > 0, 10)
        page.click("#tab-gallery")
        thumb = page.locator("#gallery .thumb img").first
        wait_for(lambda: thumb.evaluate("img => img.naturalWidth") > 0, 10)
        page.locator("#gallery .thumb").first.click()
        full = page.locator("#viewer-image")
        wait_for(lambda: full.evaluate("img => img.complete && img.naturalWidth") == 64, 10)
        page.keyboard.press("Escape")
        page.click("#select-mode")
        page.locator("#gallery .thumb").first.click()
        with page.expect_download() as download_info:
            page.click("#select-zip")
        assert zipfile.is_zipfile(download_info.value.path())
    finally:
        context.close()
    assert any(u.endswith("/api/events") for u in urls), urls
    assert any("/api/outputs/" in u and "thumb=" in u for u in urls), urls
    assert not [u for u in urls if token in u or "token=" in u], urls


# -- accessibility of the new states -------------------------------------------------------
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_gallery_states_pass_axe_and_are_tappable(start_api, browser, device, scheme, axe_source):
    api = start_api()
    entries = make_images(api, ["for the gallery " + "long " * 20, "another one"])
    api("PATCH", f"/api/outputs/{entries[0]['filename']}", json={"favourite": True})
    context = new_context(browser, device, scheme)
    page = context.new_page()
    try:
        page.goto(api.url + "/#gallery")
        expect(tiles(page)).to_have_count(2)
        page.add_script_tag(content=axe_source)
        found: dict[str, list[str]] = {}
        controls: dict[str, list[dict]] = {}

        def check(state: str) -> None:
            found[state] = page.evaluate(AXE_RUN)
            controls[state] = page.evaluate(CONTROLS)

        page.click("#filter-more")
        page.fill("#filter-q", "gallery")
        expect(tiles(page)).to_have_count(1)
        check("filters open")
        page.fill("#filter-q", "nothing like it")
        expect(page.locator("#gallery-empty")).to_be_visible()
        check("nothing matches")
        page.click("#gallery-empty-clear")
        expect(tiles(page)).to_have_count(2)
        page.locator(".tile-delete").last.click()
        expect(page.locator("#toast-undo")).to_be_visible()
        check("toast")
        page.click("#toast-undo")
        expect(tiles(page)).to_have_count(2)
        page.click("#select-mode")
        page.locator("#gallery .thumb").first.click()
        expect(page.locator("#select-count")).to_have_text("1 selected")
        check("select mode")
        page.click("#select-done")
        page.locator("#gallery .thumb").first.click()
        expect(page.locator("#viewer-favourite")).to_have_attribute("aria-pressed", "true")
        check("viewer")
        assert not any(found.values()), found
        for state, shown in controls.items():
            assert not [c["what"] for c in shown if not c["labelled"]], state
            if device == "phone":
                small = [c for c in shown if c["width"] < 44 or c["height"] < 44]
                assert not small, (state, small)
        if device == "phone":
            assert page.evaluate("document.documentElement.scrollWidth") <= 375
    finally:
        context.close()


def test_ui_jobs_are_marked_as_coming_from_the_ui(start_api, page: Page):
    api = start_api(workers=False)
    sent: list[str | None] = []
    page.on(
        "request",
        lambda r: (
            sent.append(r.headers.get("x-imagineerd-source"))
            if r.url.endswith("/api/generate")
            else None
        ),
    )
    page.goto(api.url)
    page.fill("#prompt", "from the page")
    page.click("#generate")
    expect(page.locator("#create-status")).to_have_text("Queued job #1.")
    assert sent == ["ui"]
    assert api.daemon.job(1).source == "ui"
