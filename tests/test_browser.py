"""Headless Chromium drives the demo app: upload an image, watch the answer stream, check the live panel, open the
Batch jobs tab."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ASSETS = Path(__file__).resolve().parents[1] / "assets"
# Without the networking flags Chromium keeps dialling Google's hosts, which this closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 900}

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Debian's chromium is not installed at {CHROMIUM}")

# Selectors: gradio's own data-testid attributes inside the app's elem_ids.
STATUS = "#status"
PANEL = "#panel"
FILE_INPUT = "#message input[type=file]"
TEXTAREA = "#message textarea"
USER_MESSAGES = "#chatbot [data-testid='user']"
BOT_MESSAGES = "#chatbot [data-testid='bot']"
SUBMIT_BUTTON = "#message [data-testid='submit-button']"
JOBS_TAB_BUTTON = "#batch-jobs-button"  # gradio gives a tab's button its elem_id + "-button"
CHAT_TAB_BUTTON = "#chat-tab-button"
JOB_STATUS = "#job-status"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _watch_stream(page: Any, timeout_s: float) -> list[int]:
    """Reads the last bot message as fast as the page allows; returns the distinct lengths seen, until it grew."""
    bot = page.locator(BOT_MESSAGES).last
    bot.wait_for(timeout=timeout_s * 1000)
    lengths: list[int] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        n = len(bot.inner_text())
        if not lengths or n != lengths[-1]:
            lengths.append(n)
        if len(lengths) >= 2 and 0 < lengths[-2] < lengths[-1]:
            break
        page.wait_for_timeout(30)
    return lengths


def test_image_turn_streams_and_updates_the_panel(demo_app_server: tuple[Any, str], browser: Any) -> None:
    from playwright.sync_api import expect

    app, url = demo_app_server
    problems: list[str] = []
    page = browser.new_page(viewport=VIEWPORT)
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    try:
        page.goto(url)
        expect(page.locator(STATUS)).to_contain_text("Ready:", timeout=30_000)
        expect(page.locator(STATUS)).to_contain_text("demo model: random weights")
        # No GPU here (the CPU test run): the panel says so; on a GPU box it shows VRAM instead.
        gpu_word = "no NVIDIA GPU found" if app.service.snapshot().gpu is None else "VRAM"
        expect(page.locator(PANEL)).to_contain_text("no request yet", timeout=10_000)
        expect(page.locator(PANEL)).to_contain_text(gpu_word)

        page.set_input_files(FILE_INPUT, str(ASSETS / "example.png"))
        # The thumbnail appears once the upload finished; submitting earlier would send no file.
        expect(page.locator("#message img").first).to_be_visible(timeout=15_000)
        page.locator(TEXTAREA).fill("Describe this image.")
        page.locator(TEXTAREA).press("Enter")

        lengths = _watch_stream(page, timeout_s=30)
        assert len(lengths) >= 2 and 0 < lengths[-2] < lengths[-1], f"the answer never grew while streaming: {lengths}"
        # While the answer streams (512 new tokens take seconds on CPU) the textbox is locked and its
        # submit button hidden; both coming back means the turn is over.
        expect(page.locator(TEXTAREA)).to_be_disabled()
        expect(page.locator(SUBMIT_BUTTON)).to_be_visible(timeout=60_000)
        expect(page.locator(TEXTAREA)).to_be_enabled()
        expect(page.locator(PANEL)).to_contain_text(
            re.compile(r"last answer\s+\d+ tokens · [\d.]+ tok/s"), timeout=10_000
        )
        expect(page.locator(PANEL)).not_to_contain_text("no request yet")

        user_img = page.locator(f"{USER_MESSAGES} img")
        expect(user_img).to_have_count(1)
        src = user_img.get_attribute("src") or ""
        assert src.endswith("example.png"), src
        assert page.request.get(src).ok, f"the uploaded image is not served: {src}"
        expect(page.locator(USER_MESSAGES).last).to_contain_text("Describe this image.")
        expect(page.locator(BOT_MESSAGES)).to_have_count(1)
        assert page.locator(BOT_MESSAGES).last.inner_text().strip(), "the bot reply is empty"

        # For the README, only when asked (QWEN3VL_SCREENSHOT=1): the image turn from the top, the panel beside it.
        if os.environ.get("QWEN3VL_SCREENSHOT") == "1":
            page.locator("#chatbot [role='log']").evaluate("el => el.scrollTo(0, 0)")
            page.wait_for_timeout(300)
            page.screenshot(path=str(ASSETS / "screenshot.png"), full_page=True)

        # The operator's Batch jobs tab (the app listens on loopback: everyone here is the operator); back to the chat.
        page.locator(JOBS_TAB_BUTTON).click()
        expect(page.locator(JOB_STATUS)).to_contain_text("No job yet", timeout=10_000)
        expect(page.locator("#job-start")).to_be_visible()
        expect(page.locator("#chatbot")).to_be_hidden()
        page.locator(CHAT_TAB_BUTTON).click()
        expect(page.locator(BOT_MESSAGES)).to_have_count(1)
        assert not problems, "errors in the browser console:\n" + "\n".join(problems)
    finally:
        page.close()
