"""The annotation app in headless Chromium (Debian's package, driven by Playwright for Python):
log in, three instances by mouse and keys (one flagged with a description), SIGKILL the server,
resume at the fourth, answer a compare round by keys, check export and win rates by hand count;
on the way, the synchronised magnifier (``z``) of both tasks, and no Content-Security-Policy
refusal. Screenshots land in the test's tmp folder (``instances.png``, ``compare.png``,
``instances_zoom.png``, ``compare_zoom.png``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pipeline.annotate import tasks, winrates
from pipeline.annotate.cli import main as annotate
from pipeline.annotate.store import Store, db_path
from pipeline.annotate.synthetic import write_synthetic_results
from pipeline.io.tables import read_table
from tests.test_annotate import FRAMEWORK, Server

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: where screenshots are copied as well (optional; the test's tmp folder always has them)
SHOTS = os.environ.get("DSPO_SCREENSHOTS")

#: the only way to skip these tests: ``DSPO_SKIP_BROWSER_TESTS=1`` (a missing chromium or
#: Playwright is a failure saying what to install, never a silent skip)
SKIP_VARIABLE = "DSPO_SKIP_BROWSER_TESTS"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get(SKIP_VARIABLE) == "1", reason=f"{SKIP_VARIABLE}=1 skips the browser tests"
    ),
]


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not CHROMIUM.exists():
        return (
            f"Debian's chromium is not at {CHROMIUM}: `apt-get install -y chromium` (as "
            f".ci/run does), or set {SKIP_VARIABLE}=1 to skip the browser tests"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return (
            f'Playwright for Python is not installed: `pip install -e ".[test]"`, or set '
            f"{SKIP_VARIABLE}=1 to skip the browser tests"
        )
    return None


@pytest.fixture(autouse=True)
def browser_available():
    """Fail (not skip) when the browser cannot run, unless the skip variable says so."""
    reason = missing_browser()
    if reason:
        pytest.fail(reason, pytrace=False)


def shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / name), full_page=True)
    return path


def ready(page, what: str) -> None:
    """Wait until the page shows task ``what`` (``instances:N`` / ``compare:N``) and takes keys."""
    page.wait_for_selector(f'body[data-ready="{what}"]', timeout=10_000)


#: computed ``transform`` of an image at each zoom of the synchronised magnifier
SCALES = {1: "none", 2: "matrix(2, 0, 0, 2, 0, 0)", 4: "matrix(4, 0, 0, 4, 0, 0)"}


def point_at(page, selector: str, fraction: tuple[float, float]) -> None:
    """Move the mouse to ``fraction`` (x, y) of the box of the element ``selector`` names."""
    box = page.locator(selector).bounding_box()
    page.mouse.move(box["x"] + fraction[0] * box["width"], box["y"] + fraction[1] * box["height"])


def magnified(page, images: str) -> list[tuple[str, float, float]]:
    """Each visible image's (transform, origin x, origin y), the origin as a fraction of its box."""
    return page.evaluate(
        """(selector) => [...document.querySelectorAll(selector)]
             .filter((img) => img.offsetParent !== null).map((img) => {
               const style = getComputedStyle(img);
               const [x, y] = style.transformOrigin.split(" ").map(parseFloat);
               return [style.transform, x / img.clientWidth, y / img.clientHeight];
             })""",
        images,
    )


def check_zoom(page, images: str, label: str, hovered: str, fraction, tmp_path, name) -> None:
    """``z`` cycles 1x -> 2x -> 4x -> 1x; every image of the task magnifies the point under
    the mouse on ``hovered`` (the same fraction of each image's box)."""
    for zoom in (2, 4, 1):
        page.keyboard.press("z")
        expect_text(page, label, f"Zoom {zoom}× (z)")
        point_at(page, hovered, fraction)
        views = magnified(page, images)
        assert len(views) >= 3, views
        for transform, x, y in views:
            assert transform == SCALES[zoom], views
            assert (x, y) == pytest.approx(fraction, abs=0.02), views
        if zoom == 4:
            shot(page, tmp_path, name)


def expect_text(page, selector: str, text: str) -> None:
    from playwright.sync_api import expect

    expect(page.locator(selector)).to_have_text(text)


def test_browser_annotation_session_survives_a_killed_server(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    results = write_synthetic_results(tmp_path / "results", FRAMEWORK)
    token = Store(db_path(results, FRAMEWORK)).add_annotator("alice")
    extra = ("--repeat-fraction", "0.25", "--gold", "1")
    server = Server(results, *extra).start()
    instance_tasks = tasks.instance_tasks(results, FRAMEWORK)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        refused = []  # the page must work under the server's Content-Security-Policy
        page.on("console", lambda m: refused.append(m.text) if "Security Policy" in m.text else 0)
        try:
            page.goto(server.url + "/")
            page.fill("#token", "wrong-token")
            page.click("#login-form button")
            expect(page.locator("#login-error")).to_have_text("Unknown token.")
            page.fill("#token", token)
            page.press("#token", "Enter")
            expect(page.locator("#inst-progress")).to_have_text("0 / 6 done")
            # 1: mouse only, flagged with a description
            cards = page.locator("#inst-grid .card[data-index]")
            expect(cards).to_have_count(4)
            ready(page, "instances:0")
            check_zoom(
                page,
                "#inst-grid .zoom img",
                "#inst-zoom",
                "#inst-grid .card[data-index='1'] .zoom",
                (0.25, 0.7),
                tmp_path,
                "instances_zoom.png",
            )
            cards.nth(0).locator(".pick-best").click()
            cards.nth(1).locator(".pick-worst").click()
            cards.nth(2).locator(".pick-flag").click()
            page.fill("#inst-description", "fake text on the wall")
            page.keyboard.press("Escape")
            page.evaluate("document.activeElement.blur()")
            expect(page.locator("#inst-hq-card")).to_be_hidden()  # `hidden` beats the CSS
            page.keyboard.press("h")  # show the HQ for the screenshot
            expect(page.locator("#inst-hq-card")).to_be_visible()
            shot(page, tmp_path, "instances.png")
            page.click("#inst-submit")
            expect(page.locator("#inst-progress")).to_have_text("1 / 6 done")
            # 2 and 3: keys only (best 3, worst 4 / best 2, worst 1, flag 4 with text)
            ready(page, "instances:1")
            page.keyboard.press("3")
            page.keyboard.press("Shift+4")
            page.keyboard.press("Enter")
            expect(page.locator("#inst-progress")).to_have_text("2 / 6 done")
            ready(page, "instances:2")
            page.keyboard.press("2")
            page.keyboard.press("Shift+1")
            page.keyboard.press("r")
            page.keyboard.press("/")
            page.keyboard.type("melted fingers")
            page.keyboard.press("Enter")
            expect(page.locator("#inst-progress")).to_have_text("3 / 6 done")
            server.kill()
            server = Server(results, *extra, port=server.port).start()
            page.reload()  # the token stays in the tab's session storage
            expect(page.locator("#inst-progress")).to_have_text("3 / 6 done")
            fourth = instance_tasks[3]
            expect(page.locator("#inst-title")).to_have_text(
                f"image {fourth.image_id}, instance {fourth.instance_id}"
            )
            # the compare round, by keys: 1 left, 2 right, 3 tie, 4 both bad, in turn
            page.click("#tab-compare")
            ready(page, "compare:0")
            total = int(page.locator("#cmp-progress").inner_text().split("/")[1].split()[0])
            expect(page.locator("#cmp-left")).to_have_attribute("src", re.compile("^blob:"))
            shot(page, tmp_path, "compare.png")
            check_zoom(
                page,
                "#cmp-row .zoom img",
                "#cmp-zoom",
                "#cmp-right >> xpath=..",
                (0.7, 0.3),
                tmp_path,
                "compare_zoom.png",
            )
            keys = ["1", "ArrowRight", "t", "b", "ArrowLeft", "2"]
            for i in range(total):
                expect(page.locator("#cmp-progress")).to_have_text(f"{i} / {total} done")
                ready(page, f"compare:{i}")
                page.keyboard.press(keys[i % len(keys)])
            expect(page.locator("#cmp-done")).to_be_visible()
            assert refused == []
        finally:
            browser.close()
            if server.process.poll() is None:
                server.kill()
    assert annotate(["export", "--results", str(results), "--framework", FRAMEWORK]) == 0
    out = results / "annotations" / FRAMEWORK
    annotations = read_table(out / "annotations.parquet", "annotations")
    by_task = annotations.set_index(["image_id", "instance_id"])
    expected = [
        ((0, 1, [2]), "fake text on the wall"),
        ((2, 3, []), ""),
        ((1, 0, [3]), "melted fingers"),
    ]
    assert len(annotations) == 3
    for task, ((best, worst, flagged), text) in zip(instance_tasks, expected, strict=False):
        row = by_task.loc[(task.image_id, task.instance_id)]
        assert row["best"] == task.candidates[best] and row["worst"] == task.candidates[worst]
        assert row["flagged"] == ";".join(task.candidates[i] for i in flagged)
        assert row["description"] == text
    votes = read_table(out / "votes.parquet", "votes")
    order = tasks.compare_tasks(
        tasks.RoundSettings(
            1, 0, {"synthetic": str(results / "data/test")}, (), "dspo_fidelity", 0.25, 1
        ),
        results,
        FRAMEWORK,
        "alice",
    )
    assert len(votes) == len(order)
    answers = {
        "1": "left",
        "ArrowLeft": "left",
        "2": "right",
        "ArrowRight": "right",
        "t": "tie",
        "b": "both_bad",
    }
    pressed = [answers[keys[i % len(keys)]] for i in range(len(order))]
    assert votes.sort_values("answered_at")["answer"].tolist() == pressed
    # the win-rate table against a count by hand from the tasks and the keys pressed
    rates = winrates.win_rates(votes, resamples=100).set_index("opponent")
    for opponent, row in rates.iterrows():
        wins = losses = ties = 0
        for task, answer in zip(order, pressed, strict=True):
            if task.gold or task.repeated or opponent not in (task.left, task.right):
                continue
            chosen = {"left": task.left, "right": task.right}.get(answer)
            wins += chosen == "dspo_fidelity"
            losses += chosen == opponent
            ties += chosen is None
        assert (row["wins"], row["losses"], row["ties"]) == (wins, losses, ties)
        assert row["win_rate"] == pytest.approx((wins + ties / 2) / (wins + losses + ties))
