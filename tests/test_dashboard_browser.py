"""The dashboard end to end in real headless Chromium (Debian's `chromium`, driven by
Playwright) against the whole stack over HTTP: the app on the test database, the local
Replicate simulator (delivering some webhooks twice) and a worker thread. Saves the
screenshots in docs/ that the dashboard's documentation shows.

Skips, saying why, when Playwright or Chromium is missing (./test.sh installs both)."""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import requests
from werkzeug.serving import make_server

from service import create_app
from tests.conftest import with_database
from tests.stack import Stack, running_stack

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The screenshots the docs show are refreshed only on request (SAVE_SCREENSHOTS=1
# ./test.sh tests/test_dashboard_browser.py); an ordinary run writes them to a temp dir
# so it does not leave the checkout modified.
DOCS = (Path(__file__).resolve().parent.parent / "docs" if os.environ.get("SAVE_SCREENSHOTS")
        else Path(tempfile.mkdtemp(prefix="dashboard-shots-")))
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 30_000

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: run ./test.sh")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=(
    f"no Chromium at {CHROMIUM}: ./test.sh installs Debian's chromium with apt-get when it can "
    "(as root); or set CHROMIUM to a Chromium binary"))


@pytest.fixture(scope="module")
def stack(server_url: str, template_db: str) -> Iterator[Stack]:
    """One stack for the module: the browser tests share its jobs."""
    name = f"rjs_browser_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    try:
        with running_stack(with_database(server_url, name), speed=10.0,
                           faults={"faults": ["duplicate"], "seed": 3}) as running:
            yield running
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser, stack):
    """A fresh page; fails the test if the page logged an error (a CSP violation included)."""
    context = browser.new_context(viewport=DESKTOP, base_url=stack.base_url)
    opened = context.new_page()
    opened.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    # the browser logs every 4xx answer too; a 422 is the API refusing bad input on purpose
    opened.on("console", lambda m: errors.append(m.text)
              if m.type == "error" and "status of 422" not in m.text else None)
    opened.on("pageerror", lambda e: errors.append(str(e)))
    yield opened
    context.close()
    assert errors == [], errors


def row(page, job_id: str):
    return page.locator(f'tr[data-job="{job_id}"]')


def expect(locator):
    return sync_api.expect(locator)


def wait_for_images(page) -> None:
    """Both images of the first output loaded (auto-waiting assertions: the page's CSP
    forbids the eval that page.wait_for_function would need)."""
    for kind in ("Original", "Processed"):
        image = page.locator(f'img[data-kind="{kind}"]').first
        expect(image).to_have_js_property("complete", True)
        expect(image).not_to_have_js_property("naturalWidth", 0)


def natural_size(image) -> list[int]:
    return image.evaluate("i => [i.naturalWidth, i.naturalHeight]")


def jobs(stack: Stack) -> list[dict]:
    return requests.get(f"{stack.base_url}/api/jobs?limit=100", timeout=10).json()["jobs"]


def finished_job(stack: Stack, **body) -> dict:
    created = stack.create_job(**body)
    return stack.wait(created["id"], {"completed"}, seconds=30)


def test_a_job_created_from_the_form_progresses_by_refresh(page, stack):
    page.goto("/#/new")
    page.get_by_label("Model (owner/name)").fill("stability-ai/sdxl")
    page.get_by_label("Prompt").fill("a lighthouse at dusk")
    page.get_by_label("3:4").check()
    page.get_by_label("Count (predictions to run, 1–50)").fill("1")
    page.get_by_label("Post-processing").select_option("auto")
    page.get_by_role("button", name="Create job").click()
    page.wait_for_url(re.compile(r"#/jobs/[0-9a-f-]{36}$"))
    job_id = page.url.rsplit("/", 1)[1]
    expect(page.locator(".job-id")).to_have_text(job_id)

    page.goto("/#/")
    expect(row(page, job_id)).to_be_visible()
    seen = [row(page, job_id).get_attribute("data-status")]
    for _ in range(120):
        if seen[-1] == "completed":
            break
        page.wait_for_timeout(250)
        page.get_by_role("button", name="Refresh").click()
        expect(page.locator("#refresh")).to_be_enabled()
        seen.append(row(page, job_id).get_attribute("data-status"))
    assert seen[0] != "completed" and seen[-1] == "completed", seen
    expect(row(page, job_id).get_by_role("progressbar")).to_have_attribute("aria-valuenow", "1")
    expect(row(page, job_id)).to_contain_text("3:4")
    expect(page.locator("#updated")).to_contain_text(re.compile(r"Updated (just now|\d+ s ago)"))


def test_live_updates_move_a_job_without_refresh(page, stack):
    page.goto("/#/")
    expect(page.locator("#live-status")).to_have_text("Off: press Refresh")
    page.get_by_label("Auto-refresh").check()
    # LISTEN, or the service's own polling when its LISTEN probe is slow (a loaded machine):
    # either way the page is fed by server events
    expect(page.locator("#live-status")).to_have_text(re.compile(r"^Live: server events"), timeout=20000)
    created = stack.create_job(model="black-forest-labs/flux-schnell", input={"prompt": "a kite"}, count=2)
    expect(row(page, created["id"])).to_be_visible()  # no Refresh pressed: the stream said so
    expect(row(page, created["id"])).to_have_attribute("data-status", "completed")
    assert stack.job(created["id"])["status"] == "completed"
    page.get_by_label("Auto-refresh").uncheck()
    expect(page.locator("#live-status")).to_have_text("Off: press Refresh")


def test_the_detail_shows_both_images_and_the_timeline(page, stack):
    # the model makes 3:4 (768 × 1024) when asked in its input; the job resizes to 1080 × 1440
    job = finished_job(stack, model="stability-ai/sdxl", input={"prompt": "a harbour", "aspect_ratio": "3:4"})
    page.goto(f"/#/jobs/{job['id']}")
    processed = page.locator('img[data-kind="Processed"]')
    original = page.locator('img[data-kind="Original"]')
    expect(processed).to_have_count(1)
    wait_for_images(page)
    assert natural_size(processed) == [1080, 1440]
    assert natural_size(original) == [768, 1024]
    expect(page.locator(".shot figcaption").nth(1)).to_contain_text("1080 × 1440 px")
    expect(page.locator("[data-success-rate]")).to_have_text("100%")
    expect(page.locator(".predictions tbody tr")).to_have_count(1)

    webhooks = page.locator('li[data-type="replicate.webhook"]')
    assert webhooks.count() >= 2
    expect(page.locator('li[data-type="job.created"]')).to_have_count(1)
    expect(page.locator('li[data-type="output.processed"]')).to_contain_text("1080x1440")
    first = webhooks.first
    first.get_by_role("button", name="Raw JSON").click()
    expect(first.get_by_role("button", name="Raw JSON")).to_have_attribute("aria-expanded", "true")
    expect(first.locator("pre")).to_contain_text('"webhook-id"')
    page.set_viewport_size({"width": 1280, "height": 1500})
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(DOCS / "dashboard-detail.png"))


def test_a_two_step_job_shows_its_steps_apart_and_counts_both(page, stack):
    merge = {"model": "black-forest-labs/flux-kontext-pro",
             "input": {"prompt": "in a cafe", "input_image": "{{outputs[0]}}"}}
    job = finished_job(stack, model="black-forest-labs/flux-schnell", input={"prompt": "a product"},
                       aspect_ratio="3:4", then=merge)
    page.goto(f"/#/jobs/{job['id']}")
    steps = page.locator("li.step")
    expect(steps).to_have_count(2)
    expect(steps.nth(0)).to_contain_text("Step 1 black-forest-labs/flux-schnell")
    expect(steps.nth(0)).to_contain_text("1/1 predictions, 1 output processed")
    expect(steps.nth(1)).to_contain_text("Step 2 black-forest-labs/flux-kontext-pro")
    expect(steps.nth(1)).to_contain_text("1/1 predictions, 1 output processed")
    expect(page.locator("#progress-title + .progress")).to_have_attribute("aria-valuemax", "2")
    for step in (1, 2):
        section = page.locator(f'section.step-images[data-step="{step}"]')
        expect(section.locator('img[data-kind="Processed"]')).to_have_count(1)
    wait_for_images(page)
    page.screenshot(path=str(DOCS / "dashboard-two-step.png"), full_page=True)
    page.goto("/#/")
    expect(row(page, job["id"])).to_contain_text("2/2 predictions")


def test_redelivered_webhooks_are_marked_and_counted(page, stack):
    job = finished_job(stack, model="black-forest-labs/flux-schnell", input={"prompt": "x"}, count=3)
    redelivered = [d for d in stack.sim.webhook_log if d.response_code == 200]
    assert len({d.webhook_id for d in redelivered}) < len(redelivered)  # the fault did deliver twice
    page.goto(f"/#/jobs/{job['id']}")
    expect(page.locator(".timeline")).to_be_visible()
    page.goto("/#/")
    duplicates = page.locator('[data-stat="duplicates"] .stat-value')
    expect(duplicates).not_to_have_text("0")
    with stack.app.extensions["db_pool"].connection() as conn:
        counted = conn.execute("SELECT count(*) AS n FROM unrecorded_webhooks WHERE outcome = 'duplicate'"
                               ).fetchone()["n"]
    assert counted == len(redelivered) - len({d.webhook_id for d in redelivered})
    expect(duplicates).to_have_text(str(counted))


def test_field_errors_are_shown_next_to_their_fields(page, stack):
    page.goto("/#/new")
    unlabelled = page.evaluate("[...document.querySelectorAll('input, select, textarea')]"
                               ".filter(e => !e.labels.length && !e.getAttribute('aria-label'))"
                               ".map(e => e.id)")
    assert unlabelled == []
    page.get_by_label("Other input (JSON object)").fill("{oops")
    page.get_by_role("button", name="Create job").click()
    expect(page.locator("#input-error")).to_contain_text("not valid JSON")

    page.get_by_label("Other input (JSON object)").fill('{"seed": 1}')
    page.get_by_label("Model (owner/name)").fill("not a model")
    page.get_by_label("Count (predictions to run, 1–50)").fill("0")
    page.get_by_role("button", name="Create job").click()
    expect(page.locator("#target-error")).to_contain_text("must be owner/name")
    expect(page.locator("#count-error")).to_be_visible()
    expect(page.get_by_label("Model (owner/name)")).to_have_attribute("aria-invalid", "true")
    expect(page.locator(".error-summary")).to_be_focused()
    expect(page.locator("#input-error")).to_be_hidden()
    assert not [j for j in jobs(stack) if j["model"] == "not a model"]  # nothing was recorded


def test_a_busy_list_filters_by_status_and_model(page, stack):
    failed = stack.create_job(model="stability-ai/sdxl", input={"prompt": "please fail"})
    stack.create_job(model="black-forest-labs/flux-schnell", input={"prompt": "a batch"}, count=8,
                     aspect_ratio="9:16")
    stack.wait(failed["id"], {"failed"})
    page.goto("/#/")
    expect(row(page, failed["id"])).to_have_attribute("data-status", "failed")
    page.get_by_label("Status").select_option("failed")
    page.wait_for_url(re.compile(r"#/\?status=failed$"))
    expect(page.locator("table.jobs tbody tr")).to_have_count(1)
    page.get_by_label("Status").select_option("")
    page.get_by_label("Model").select_option("black-forest-labs/flux-schnell")
    expect(page.locator("table.jobs tbody tr").first).to_contain_text("flux-schnell")
    assert all("flux-schnell" in t for t in page.locator("td.model").all_inner_texts())
    page.get_by_label("Model").select_option("")
    page.get_by_label("Find a job or prediction by id").fill(failed["id"][-8:])
    page.get_by_role("button", name="Find").click()
    page.wait_for_url(re.compile(f"#/jobs/{failed['id']}$"))
    expect(page.locator(".callout-error")).to_be_visible()  # the job's error
    page.goto("/#/")
    expect(page.locator("tr[data-job]")).not_to_have_count(0)
    expect(page.locator('[data-stat="rate"]')).to_be_visible()
    expect(page.locator("#refresh")).to_be_enabled()
    page.screenshot(path=str(DOCS / "dashboard-list.png"), full_page=True)


def test_the_dashboard_works_at_phone_width(browser, stack):
    job = finished_job(stack, model="black-forest-labs/flux-schnell", input={"prompt": "a tram"},
                       aspect_ratio="9:16")
    context = browser.new_context(viewport=PHONE, base_url=stack.base_url, device_scale_factor=2,
                                  is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto("/#/")
        expect(row(page, job["id"])).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        page.screenshot(path=str(DOCS / "dashboard-phone.png"), full_page=True)
        page.goto(f"/#/jobs/{job['id']}")
        wait_for_images(page)
        assert natural_size(page.locator('img[data-kind="Processed"]')) == [1080, 1920]
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        page.locator("#images-title").scroll_into_view_if_needed()
        page.wait_for_timeout(300)  # let the images just scrolled into view paint
        page.screenshot(path=str(DOCS / "dashboard-phone-detail.png"), full_page=False)
    finally:
        context.close()


# The text segments between underscores of the health panel's setting names that the
# browser laid out over more than one line (a name broken mid-word).
SPLIT_SETTING_WORDS = """() => [...document.querySelectorAll('.stat-detail code.setting')]
    .flatMap(c => [...c.childNodes].filter(n => n.nodeType === Node.TEXT_NODE && n.data !== '_'))
    .filter(t => { const r = document.createRange(); r.selectNodeContents(t);
                   return r.getClientRects().length > 1; })
    .map(t => t.data)"""


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_setting_names_in_the_health_panel_wrap_only_after_an_underscore(browser, stack, viewport):
    context = browser.new_context(viewport=viewport, base_url=stack.base_url)
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto("/#/")
        names = page.locator(".stat-detail code.setting")
        expect(names).to_have_count(2)
        assert sorted(names.all_inner_texts()) == ["EVENTS_RAW_RETENTION_DAYS", "RECONCILE_AFTER_SECONDS"]
        assert page.evaluate(SPLIT_SETTING_WORDS) == []
        size = page.locator('[data-stat="store-size"] .stat-value')
        expect(size).to_have_text(re.compile(r"^\d+\.\d (KB|MB|GB)$"))
    finally:
        context.close()


def test_keyboard_reaches_the_controls_in_order(page, stack):
    page.goto("/#/")
    expect(page.locator("table.jobs")).to_be_visible()
    # Refresh is disabled while a load runs, and a disabled button is not in the tab order:
    # wait until the first load has finished (it says when it was updated, and re-enables it)
    expect(page.locator("#updated")).to_have_text(re.compile(r"^Updated "))
    expect(page.locator("#refresh")).to_be_enabled()
    page.keyboard.press("Tab")
    expect(page.locator(".skip-link")).to_be_focused()
    names = []
    for _ in range(6):
        page.keyboard.press("Tab")
        names.append(page.evaluate("document.activeElement.id || document.activeElement.textContent.trim()"))
    assert names[:6] == ["Replicate jobs", "Jobs", "New job", "refresh", "auto", "health-window"], names
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"


# --- SUPABASE_URL and SUPABASE_ANON_KEY set: still the service's own stream -------------

@contextmanager
def app_alone(server_url: str, template_db: str, name: str, config: dict) -> Iterator[str]:
    """The app alone (no worker: its jobs stay pending) on a database of its own, over HTTP."""
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    app = create_app({"TESTING": True, "DATABASE_URL": with_database(server_url, name), **config})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        app.extensions["db_pool"].close()
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def supabase_app(server_url: str, template_db: str) -> Iterator[str]:
    """Started with SUPABASE_URL and SUPABASE_ANON_KEY in its environment, as
    docs/deploy.md used to have operators set them."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SUPABASE_URL", "https://realtime-test.supabase.co")
        env.setenv("SUPABASE_ANON_KEY", "anon-test-key")
        with app_alone(server_url, template_db, f"rjs_browser_sb_{os.getpid()}", {}) as url:
            yield url


def test_with_supabase_keys_set_live_updates_come_from_the_event_stream(browser, supabase_app):
    """Before, these settings switched the page to Supabase Realtime with the anon key, which
    since migration 009 (sql/supabase_security.sql) receives nothing: the page said "live" and
    stayed still."""
    context = browser.new_context(viewport=DESKTOP, base_url=supabase_app)
    elsewhere: list[str] = []
    errors: list[str] = []
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("request", lambda r: None if r.url.startswith(supabase_app) else elsewhere.append(r.url))
        page.on("websocket", lambda ws: elsewhere.append(ws.url))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto("/#/")
        expect(page.locator("tbody td.empty")).to_be_visible()
        with page.expect_request(lambda r: r.url.endswith("/api/dashboard/stream")):
            page.get_by_label("Auto-refresh").check()
        expect(page.locator("#live-status")).to_have_text(re.compile(r"^Live: server events"), timeout=20000)

        first = create(supabase_app)
        # no Refresh pressed, and sooner than the 10 s polling the page falls back to
        expect(row(page, first)).to_be_visible(timeout=8000)
        second = create(supabase_app)
        expect(row(page, second)).to_be_visible(timeout=8000)
        expect(page.locator("#live-status")).to_have_text(re.compile(r"^Live: server events"))
    finally:
        context.close()
    assert elsewhere == [] and errors == [], (elsewhere, errors)


def test_a_busy_stream_polls_every_10_s_meanwhile(browser, server_url, template_db):
    """Every stream slot taken (503): the page polls, so a new job still shows up."""
    with app_alone(server_url, template_db, f"rjs_browser_busy_{os.getpid()}",
                   {"DASHBOARD_STREAMS": 0}) as base_url:
        context = browser.new_context(viewport=DESKTOP, base_url=base_url)
        try:
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto("/#/")
            expect(page.locator("tbody td.empty")).to_be_visible()
            page.get_by_label("Auto-refresh").check()
            expect(page.locator("#live-status")).to_have_text("Live stream busy; polling every 10 s")
            page.wait_for_timeout(500)  # past the first refetch
            created = create(base_url)
            expect(row(page, created)).to_be_visible(timeout=15000)  # the next poll, no Refresh
        finally:
            context.close()


def create(base_url: str) -> str:
    response = requests.post(f"{base_url}/api/jobs", json={"model": "a/b", "input": {"prompt": "x"}},
                             timeout=10)
    assert response.status_code == 201, response.text
    return response.json()["id"]
