"""The chat page in headless Chromium (Debian's ``chromium``, driven by Playwright; no browser
download): type a message, watch the reply stream in, check it is the server's reply rendered as
text, go on to a second turn, and use a server that needs an API key. Screenshots land in pytest's
tmp dir (their paths are printed)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from havoc_core.inference import load_for_inference
from havoc_core.serve import create_app

MODEL = "tiny-test"
KEY = "sk-test-key"
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 60_000
INJECTION = '<img src=x onerror="window.pwned = 1"><b>bold?</b>'

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")

# Counts text nodes appended to assistant bubbles: more than one means the reply arrived in pieces.
COUNT_APPENDS = """() => {
  window.appends = 0;
  new MutationObserver((records) => {
    for (const r of records) if (r.target.classList && r.target.classList.contains("assistant"))
      window.appends += [...r.addedNodes].filter((n) => n.nodeType === Node.TEXT_NODE).length;
  }).observe(document.getElementById("log"), { childList: true, subtree: true });
}"""
REPLY_TEXT = """(el) => [...el.childNodes].filter((n) => n.nodeType === Node.TEXT_NODE).map((n) => n.data).join("")"""


@pytest.fixture(scope="module")
def loaded(endless_checkpoint):
    return load_for_inference(endless_checkpoint)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield browser
        browser.close()


def send(page, text: str, turn: int) -> str:
    """Type ``text``, press Enter, wait for reply number ``turn`` to finish; its text."""
    page.fill("#input", text)
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant").nth(turn - 1)
    reply.and_(page.locator("[data-done]")).wait_for(timeout=TIMEOUT_MS)
    return reply.evaluate(REPLY_TEXT)


def test_type_a_message_and_see_the_reply_stream_in(loaded, browser, tmp_path, serving):
    model, tok = loaded
    with serving(create_app(model, tok, model_name=MODEL)) as server:
        api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        page.locator("#model", has_text=MODEL).wait_for(timeout=TIMEOUT_MS)
        page.locator("#settings summary").click()
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "40")
        page.evaluate(COUNT_APPENDS)

        first = send(page, INJECTION, 1)
        expected = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": INJECTION}],
                                               temperature=0, max_tokens=40).choices[0].message.content
        assert first == expected and first
        assert page.evaluate("window.appends") > 1  # streamed: appended piece by piece
        assert page.locator(".msg.user").first.text_content() == INJECTION  # shown as text, not markup
        assert page.locator("#log img, #log b").count() == 0 and page.evaluate("window.pwned") is None

        second = send(page, "And what about the with statement?", 2)
        history = [{"role": "user", "content": INJECTION}, {"role": "assistant", "content": first},
                   {"role": "user", "content": "And what about the with statement?"}]
        expected = api.chat.completions.create(model=MODEL, messages=history, temperature=0,
                                               max_tokens=40).choices[0].message.content
        assert second == expected  # the page sent the whole conversation
        assert page.locator(".msg.error").count() == 0 and not errors
        page.locator("#settings summary").click()  # fold the settings away for the picture
        shot = tmp_path / "chat.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")
        assert shot.stat().st_size > 0

        page.locator("#new-chat").click()
        assert page.locator(".msg").count() == 0
        page.close()


def test_page_asks_for_the_api_key_and_shows_errors(loaded, browser, tmp_path, serving):
    model, tok = loaded
    with serving(create_app(model, tok, model_name=MODEL, api_key=KEY)) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.locator("#model", has_text="API key").wait_for(timeout=TIMEOUT_MS)
        assert page.locator("#settings").evaluate("(el) => el.open")
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        page.locator("#model", has_text=MODEL).wait_for(timeout=TIMEOUT_MS)
        page.fill("#max-tokens", "100000")  # beyond the context: the server's 400 is shown, the message kept
        page.fill("#input", "hello")
        page.press("#input", "Enter")
        error = page.locator(".msg.error")
        error.wait_for(timeout=TIMEOUT_MS)
        assert "max_tokens" in error.text_content() and page.input_value("#input") == "hello"
        page.fill("#max-tokens", "5")
        assert send(page, "hello", 1)
        page.screenshot(path=str(tmp_path / "keyed.png"), full_page=True)
        print(f"screenshot: {tmp_path / 'keyed.png'}")
        page.close()
