"""The web page at /ui/, driven in Debian's headless Chromium by Playwright.

Playwright's own browser download cannot work offline, so the test uses
/usr/bin/chromium (`make test` installs it). Screenshots go to
artifacts/browser/ for a human to look at.
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from loadtests.servers import REPO_ROOT
from models.store import REPORT_FILES
from tests.helpers import STRICT_TOKEN, encode, fresh_tile, write_pyramidal_tiff

pytestmark = [pytest.mark.browser, pytest.mark.service]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = REPO_ROOT / "artifacts" / "browser"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, strict_server):
    context = browser.new_context(viewport={"width": 1200, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(f"{strict_server.url}/ui/")
    yield page
    context.close()


REPORT_FIGURES = [name for name, media in REPORT_FILES.items() if media == "image/png"]


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    return path


def enter_token(page) -> None:
    page.fill("#token", STRICT_TOKEN)
    page.dispatch_event("#token", "change")


def test_the_page_is_served_by_the_service(strict_server):
    import httpx

    moved = httpx.get(f"{strict_server.url}/ui", timeout=10)
    assert moved.status_code == 308 and moved.headers["location"] == "/ui/"
    page = httpx.get(f"{strict_server.url}/ui/", timeout=10)  # no token needed for the page itself
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("app.js", "style.css"):
        assert httpx.get(f"{strict_server.url}/ui/{asset}", timeout=10).status_code == 200, asset


def test_upload_shows_class_bars_heat_map_and_model_card(page, reference, tmp_path):
    from playwright.sync_api import expect

    expect(page.locator("#disclaimer")).to_contain_text("Research use only. Not for diagnosis.")
    # The service requires a token: without it the card cannot load, and the page says why.
    expect(page.locator("#card-error")).to_contain_text("401")
    enter_token(page)
    expect(page.locator("#card")).to_be_visible()
    expect(page.locator("#card-architecture")).to_contain_text("cnn")
    expect(page.locator("#card-classes tbody tr")).to_have_count(3)
    expect(page.locator("#card-confusion tbody tr")).to_have_count(3)

    tile = tmp_path / "adenocarcinoma.jpeg"
    tile.write_bytes(fresh_tile("lung_aca", 50))
    expected = reference.predicted_class(tile.read_bytes())
    page.set_input_files("#file", tile)
    expect(page.locator("#predicted-class")).to_have_text(expected)
    bars = page.locator("#bars li")
    expect(bars).to_have_count(3)
    assert bars.first.get_attribute("data-class") == expected  # sorted, most probable first
    values = [float(text.rstrip("%")) for text in page.locator("#bars .value").all_inner_texts()]
    assert values == sorted(values, reverse=True) and sum(values) == pytest.approx(100, abs=0.5)
    expect(page.locator("#model-tag")).to_contain_text("tiny_lung:")
    plain_src = page.get_attribute("#preview", "src")
    assert plain_src.startswith("blob:")
    screenshot(page, "prediction")

    page.check("#heatmap-toggle")
    overlay_src = page.get_attribute("#preview", "src")
    assert overlay_src.startswith("data:image/png;base64,") and len(overlay_src) > 1000
    expect(page.locator("#explained-class")).to_have_text(expected)
    screenshot(page, "heat_map")
    page.uncheck("#heatmap-toggle")
    assert page.get_attribute("#preview", "src") == plain_src


def test_a_tile_given_its_pixel_size_is_resampled_and_the_page_says_so(page, reference, tmp_path):
    from playwright.sync_api import expect

    enter_token(page)
    card = reference.stored.card
    model_mpp = card.dataset.microns_per_pixel
    expect(page.locator("#mpp")).to_have_attribute("placeholder", f"unknown (the model's: {model_mpp:g})")
    tile = tmp_path / "zoomed_out.jpeg"
    tile.write_bytes(fresh_tile("lung_n", 51))
    mpp = 2 * model_mpp
    expected = reference.expect(tile.read_bytes(), mpp)["probabilities"]
    page.fill("#mpp", f"{mpp:g}")
    page.set_input_files("#file", tile)
    expect(page.locator("#scale")).to_contain_text(f"Resampled from {mpp:g} to the model's {model_mpp:g}")
    expect(page.locator("#predicted-class")).to_have_text(card.class_names[int(np.argmax(expected))])
    page.fill("#mpp", "")
    again = tmp_path / "no_pixel_size.jpeg"  # another file: choosing the same one again fires no change
    again.write_bytes(tile.read_bytes())
    page.set_input_files("#file", again)
    expect(page.locator("#scale")).to_contain_text("No pixel size given; estimated magnification")


def test_drag_and_drop_and_rejected_files(page, reference, tmp_path):
    from playwright.sync_api import expect

    enter_token(page)
    dropped = fresh_tile("lung_scc", 51)
    encoded = base64.b64encode(dropped).decode()
    transfer = page.evaluate_handle(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "squamous.jpeg", { type: "image/jpeg" }));
            return transfer;
        }""",
        encoded,
    )
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
    expect(page.locator("#predicted-class")).to_have_text(reference.predicted_class(dropped))

    not_an_image = tmp_path / "notes.jpeg"
    not_an_image.write_text("these are notes, not a tile")
    page.set_input_files("#file", not_an_image)
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("415")
    expect(error).to_contain_text("not a supported image")
    expect(page.locator("#result")).to_be_hidden()
    expect(page.locator("#figure")).to_be_hidden()  # no broken image of the refused file
    screenshot(page, "rejected")

    truncated = tmp_path / "truncated.jpeg"
    truncated.write_bytes(fresh_tile("lung_n", 52)[:700])
    page.set_input_files("#file", truncated)
    expect(error).to_contain_text("422")


def test_a_tile_the_model_was_not_trained_for_gets_no_class_but_the_reasons(page, tmp_path):
    from PIL import Image
    from playwright.sync_api import expect

    enter_token(page)
    glass = tmp_path / "blank-slide.png"
    glass.write_bytes(encode(Image.new("RGB", (512, 512), (243, 242, 245)), "PNG"))
    page.set_input_files("#file", glass)
    notice = page.locator("#out-of-scope")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("This does not look like an H&E tile this model was trained on")
    expect(page.locator("#out-of-scope-reasons")).to_contain_text("mostly empty glass")
    expect(page.locator("#verdict")).to_be_hidden()  # no class is presented
    expect(page.locator("#bars")).to_be_hidden()
    screenshot(page, "out_of_scope")

    # The next tissue tile is shown as the service judged it: nothing of the refusal stays on the page.
    tile = tmp_path / "tile.jpeg"
    tile.write_bytes(fresh_tile("lung_n", 53))
    with page.expect_response("**/explain") as answered:
        page.set_input_files("#file", tile)
    out_of_scope = any(reason != "low_confidence" for reason in answered.value.json()["reasons"])
    expect(page.locator("#result")).to_be_visible()
    verdict = page.locator("#verdict")
    if out_of_scope:
        expect(notice).to_be_visible()
        expect(verdict).to_be_hidden()
    else:
        expect(notice).to_be_hidden()
        expect(verdict).to_be_visible()


def test_a_whole_slide_is_uploaded_analysed_and_mapped(page, reference, tmp_path):
    from playwright.sync_api import expect

    from slides.analysis import analyze
    from slides.outputs import summary

    slide_file = tmp_path / "grid.tiff"
    write_pyramidal_tiff(slide_file)
    expected = analyze(slide_file, reference.stored)  # in-process, with the card's tile size as the page asks
    enter_token(page)
    page.set_input_files("#slide-file", slide_file)
    expect(page.locator("#slide-result")).to_be_visible(timeout=120_000)
    expect(page.locator("#slide-error")).to_be_hidden()
    expect(page.locator("#slide-counts")).to_contain_text(f"{len(expected.tiles)} tiles of {expected.tile_size} px")
    facts = summary(expected, reference.stored.card.abstention.cancer_classes)
    expect(page.locator("#slide-coverage")).to_contain_text(
        f"{100 * facts['tissue_coverage']:.1f}% of the tissue found lies in analysed tiles")
    # The tiny model's card and the slide both declare a pixel size: the tiles are cut at the model's scale,
    # and the page has no warning about the scale to show.
    assert facts["scale_declared"] and facts["tile_size_basis"] == "microns_per_pixel"
    expect(page.locator("#slide-scale")).to_be_hidden()
    answered = [t.prediction.predicted_class for t in expected.tiles if not t.prediction.uncertain]
    rows = page.locator("#slide-fractions tbody tr")
    expect(rows).to_have_count(len(expected.class_names))
    shown = {row.locator("th").inner_text(): int(row.locator("td").first.inner_text()) for row in rows.all()}
    assert shown == {name: answered.count(name) for name in expected.class_names}
    assert page.evaluate("document.getElementById('slide-overlay').naturalWidth") > 0
    geojson = page.evaluate("async () => (await fetch(document.getElementById('slide-geojson').href)).json()")
    assert len(geojson["features"]) == len(expected.tiles)
    suspicious = page.locator("#slide-suspicious button")
    expect(suspicious).to_have_count(min(5, len(expected.tiles)))

    # The most suspicious tile at full resolution, where it lies on the map, then the Grad-CAM of the pixels
    # the slide answered from: its class is the slide's answer for that tile.
    top = facts["most_suspicious"][0]
    [answer] = [t.prediction for t in expected.tiles if (t.x, t.y) == (top["x"], top["y"])]
    declined = [reason for reason in answer.reasons if reason != "low_confidence"]
    suspicious.first.click()
    expect(page.locator("#slide-tile-figure")).to_be_visible()
    expect(page.locator("#slide-marker")).to_be_visible()
    expect(page.locator("#slide-tile-heatmap")).to_be_enabled()
    expect(page.locator("#slide-tile-explained")).to_have_text(
        f"no class: {', '.join(answer.reasons)}" if declined else answer.predicted_class)
    width = page.evaluate("document.getElementById('slide-tile').naturalWidth")
    assert width == expected.tile_size
    page.check("#slide-tile-heatmap")
    assert page.get_attribute("#slide-tile", "src").startswith("data:image/png;base64,")
    screenshot(page, "slide")


def test_a_file_that_is_no_slide_gets_the_reason(page, tmp_path):
    from playwright.sync_api import expect

    enter_token(page)
    notes = tmp_path / "notes.svs"
    notes.write_text("not a slide")
    page.set_input_files("#slide-file", notes)
    expect(page.locator("#slide-error")).to_contain_text("415")
    expect(page.locator("#slide-result")).to_be_hidden()


def test_the_evaluation_report_opens_as_a_page_with_its_five_figures(browser, page, strict_server, server):
    from playwright.sync_api import expect

    # Without JavaScript (and without a token): /model/report itself is the rendered report.
    context = browser.new_context(java_script_enabled=False, viewport={"width": 1200, "height": 1100})
    plain = context.new_page()
    plain.goto(f"{server.url}/model/report")
    assert_report_page(plain)
    context.close()

    # From the web page with a token: the link fetches the page with it and opens it in a new tab.
    enter_token(page)
    expect(page.locator("#card")).to_be_visible()
    with page.context.expect_page() as opened:
        page.click("#report-link")
    report = opened.value
    report.wait_for_load_state()
    assert_report_page(report)
    screenshot(report, "model_report")


def assert_report_page(report) -> None:
    from playwright.sync_api import expect

    expect(report.locator("h1")).to_contain_text("Model report")
    expect(report.locator("table").first).to_be_visible()
    figures = report.locator("img")
    expect(figures).to_have_count(len(REPORT_FIGURES))  # every figure the report writes
    for figure in figures.all():
        figure.scroll_into_view_if_needed()
        assert figure.evaluate("image => image.complete && image.naturalWidth > 0"), figure.get_attribute("alt")
    assert "![" not in report.inner_text("body")


def test_the_page_asks_for_nothing_the_service_lacks(browser, strict_server):
    context = browser.new_context()
    ui = context.new_page()
    missing = []
    ui.on("response", lambda response: missing.append(response.url) if response.status == 404 else None)
    ui.goto(f"{strict_server.url}/ui/")
    ui.wait_for_load_state("networkidle")
    context.close()
    assert missing == []  # the favicon included
