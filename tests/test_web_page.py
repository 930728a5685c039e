"""The web page in a real headless Chromium: pick an image, see neighbour thumbnails with distances.

Needs Debian's `chromium` (apt-get install -y chromium) and the `playwright` Python package (its
driver only; no `playwright install`); skips without them, unless VDSH_REQUIRE_BROWSER is set (CI).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from serving_fixtures import png_bytes, shared_server, shared_setup

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
if CHROMIUM is None and os.environ.get("VDSH_REQUIRE_BROWSER"):
    raise RuntimeError("VDSH_REQUIRE_BROWSER is set but no chromium binary is installed (apt-get install -y chromium)")
pytestmark = [pytest.mark.slow,  # a browser and a server process
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install -y chromium)")]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server():
    return shared_setup(), shared_server()


@pytest.fixture
def page(tmp_path):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_uploading_an_image_shows_neighbour_thumbnails(server, page, tmp_path):
    setup, url = server
    image_path = tmp_path / "digit.png"
    image_path.write_bytes(png_bytes(setup.query_images[0]))
    page.goto(url + "/")
    playwright_api.expect(page.locator("#stats")).to_contain_text("1,000 images")
    page.fill("#k", "8")
    page.set_input_files("#file", str(image_path))
    results = page.locator("#results li.result")
    playwright_api.expect(results).to_have_count(8, timeout=15_000)
    playwright_api.expect(page.locator("#summary")).to_contain_text("8 neighbours in")
    first = results.first
    playwright_api.expect(first.locator(".distance")).to_contain_text("distance")
    # each thumbnail loaded at the item's own size (MNIST: 28 px) and is shown in a 64 px cell
    page.wait_for_function("[...document.querySelectorAll('#results img')]"
                           ".every(i => i.complete && i.naturalWidth === 28 && i.getBoundingClientRect().width === 64)")
    assert first.locator(".labels").inner_text() in setup.class_names


def test_a_bad_file_shows_a_clear_error_and_clears_the_previous_results(server, page, tmp_path):
    setup, url = server
    good, bad = tmp_path / "digit.png", tmp_path / "broken.png"
    good.write_bytes(png_bytes(setup.query_images[1]))
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 20)
    page.goto(url + "/")
    page.set_input_files("#file", str(good))
    playwright_api.expect(page.locator("#results li.result")).to_have_count(12, timeout=15_000)
    page.set_input_files("#file", str(bad))
    playwright_api.expect(page.locator("#status")).to_contain_text("Could not search")
    playwright_api.expect(page.locator("#results li")).to_have_count(0)
    assert page.locator("#summary").inner_text() == ""


def test_a_query_far_from_everything_says_so(server, page, tmp_path):
    setup, url = server
    blank, digit = tmp_path / "blank.png", tmp_path / "digit.png"
    blank.write_bytes(png_bytes(np.full((1, 28, 28), 255, np.uint8)))  # nothing like a digit
    digit.write_bytes(png_bytes(setup.query_images[0]))
    page.goto(url + "/")
    page.set_input_files("#file", str(blank))
    playwright_api.expect(page.locator("#far")).to_contain_text("No close match", timeout=15_000)
    page.set_input_files("#file", str(digit))
    playwright_api.expect(page.locator("#results li.result")).to_have_count(12, timeout=15_000)
    playwright_api.expect(page.locator("#far")).to_be_hidden()


def test_the_page_has_a_favicon(server):
    import httpx

    _, url = server
    response = httpx.get(url + "/favicon.ico", timeout=10)
    assert response.status_code == 200 and response.content.startswith(b"\x89PNG")
