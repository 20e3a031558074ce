"""The chat page (web/static/index.html) driven by headless Chromium through selenium.

Needs Debian's `chromium` and `chromium-driver` packages and the `selenium` wheel; skips
without them. The `web_server` fixture (tests/conftest.py) yields the base URL of a running
`python -m web.server` with a tiny model. Tests that need exact replies or failures replace
`window.fetch` inside the page instead of asking the model.
"""

import json
import os
import shutil
import time

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    # An explicit driver path: selenium-manager is never run, so nothing is downloaded.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def open_page(browser, base_url):
    browser.get(base_url.rstrip("/") + "/")
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return document.readyState") == "complete")
    return browser.find_element(By.ID, "chat-input")


def wait_for(browser, css, timeout=10):
    WebDriverWait(browser, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))
    return browser.find_elements(By.CSS_SELECTOR, css)


def texts(browser, css):
    return [el.get_attribute("textContent") for el in browser.find_elements(By.CSS_SELECTOR, css)]


# Replaces fetch in the page: /health answers ok; each /chat/completions request is recorded
# in window.__requests and answered by the next entry of window.__replies, either
# {status, body} (a JSON error), {sse: "<raw event-stream text>"}, which is delivered in
# 3-byte chunks so that events and UTF-8 characters are split across reads, or {hang: true}:
# one token, then a stream that stays open until the request is aborted.
FAKE_FETCH = """
window.__requests = [];
window.__replies = [];
window.fetch = async (url, opts) => {
  if (!String(url).endsWith('/chat/completions'))
    return new Response('{"status": "ok", "ready": true}', {status: 200});
  window.__requests.push(JSON.parse(opts.body));
  const r = window.__replies.shift();
  if (r.status)
    return new Response(JSON.stringify(r.body), {status: r.status, headers: {'Content-Type': 'application/json'}});
  const bytes = new TextEncoder().encode(r.hang ? 'data: {"token": "wait"}\\n\\n' : r.sse);
  const stream = new ReadableStream({start(c) {
    for (let i = 0; i < bytes.length; i += 3) c.enqueue(bytes.slice(i, i + 3));
    if (r.hang) opts.signal.addEventListener('abort', () => c.error(new DOMException('aborted', 'AbortError')));
    else c.close();
  }});
  return new Response(stream, {status: 200, headers: {'Content-Type': 'text/event-stream'}});
};
"""


def sse(*events):
    # Raw UTF-8 (not \u escapes), so that 3-byte chunks cut through multi-byte characters.
    return "".join(f"data: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events)


def test_chat_streams_a_reply(browser, web_server):
    box = open_page(browser, web_server)
    # Record the reply's text length at every DOM change: a reply rendered token by token
    # shows partial text, one delivered in a single piece (a buffering server) does not. Also count
    # the network reads that carried tokens, and hand each to the page a task later: mutations within
    # one task reach the observer together, so reads that a busy browser found already buffered would
    # otherwise be rendered in one task, leaving no partial state to observe.
    browser.execute_script(
        """window.__seen = []; window.__token_reads = 0;
           new MutationObserver(() => {
             const a = document.querySelector('.message.assistant');
             if (a && !a.classList.contains('done')) window.__seen.push(a.textContent.length);
           }).observe(document.getElementById('messages'),
                      {subtree: true, childList: true, attributes: true, characterData: true});
           const read = ReadableStreamDefaultReader.prototype.read;
           ReadableStreamDefaultReader.prototype.read = function () {
             return read.call(this).then(r => {
               if (r.value && new TextDecoder().decode(r.value).includes('"token"')) window.__token_reads++;
               return new Promise(resolve => setTimeout(() => resolve(r), 0));
             });
           };"""
    )
    box.send_keys("Hello", Keys.ENTER)
    (reply,) = wait_for(browser, ".message.assistant.done", timeout=60)

    assert texts(browser, ".message.user") == ["Hello"]
    assert texts(browser, ".message.error") == []
    text = reply.get_attribute("textContent")
    assert text.strip(), "the assistant reply is empty"
    token_reads = browser.execute_script("return window.__token_reads")
    if int(reply.get_attribute("data-tokens")) >= 5:  # a very short reply may well come in one read
        assert token_reads >= 1
        if token_reads >= 2:  # the tokens came in pieces: the first must show before the reply is done. Its length says
            # nothing more: a later piece may close markup that the partial reply showed as characters (seen: 6 and 7
            # characters streamed, fewer in the finished reply), or add only what the page does not show
            seen = browser.execute_script("return window.__seen")
            assert any(n > 0 for n in seen), f"the reply was not shown until it was complete (lengths seen {seen}, reads {token_reads})"


def test_markdown_is_rendered_safely(browser, web_server):
    open_page(browser, web_server)
    hostile = '<img src=x onerror="window.__xss=1">**b** [l](javascript:alert(1))'
    friendly = (
        "## Title\n\n- one *two*\n- `<b>`\n\n1. first\n2. second\n\n"
        "see [site](https://example.com/a?b=1&c=2) and [x](https://e.com/\"onmouseover=\"window.__xss=2)\n\n"
        "```\n<script>window.__xss=3</script> **not bold**\n```"
    )
    # Insert the rendering the way the page does: innerHTML of renderMarkdown's output.
    browser.execute_script(
        """for (const [id, text] of [['md-hostile', arguments[0]], ['md-friendly', arguments[1]]]) {
             const el = document.createElement('div');
             el.id = id; el.className = 'message assistant done';
             el.innerHTML = window.renderMarkdown(text);
             document.getElementById('messages').appendChild(el);
           }""",
        hostile,
        friendly,
    )
    time.sleep(0.3)  # an <img src=x> would fire onerror by now

    assert browser.execute_script("return typeof window.__xss") == "undefined"
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages img, #messages script, #messages [onerror], #messages [onmouseover]")
    assert not browser.find_elements(By.CSS_SELECTOR, 'a[href^="javascript"]')
    shown = browser.find_element(By.ID, "md-hostile").get_attribute("textContent")
    assert '<img src=x onerror="window.__xss=1">' in shown and "[l](javascript:alert(1))" in shown
    assert texts(browser, "#md-hostile strong") == ["b"]

    friendly_el = "#md-friendly"
    assert texts(browser, f"{friendly_el} h2") == ["Title"]
    assert texts(browser, f"{friendly_el} ul li") == ["one two", "<b>"]
    assert texts(browser, f"{friendly_el} ul em") == ["two"]
    assert texts(browser, f"{friendly_el} ol li") == ["first", "second"]
    links = browser.find_elements(By.CSS_SELECTOR, f"{friendly_el} a")
    assert links[0].get_attribute("href") == "https://example.com/a?b=1&c=2"
    assert links[0].get_attribute("rel") == "noopener noreferrer"
    assert texts(browser, f"{friendly_el} pre code") == ["<script>window.__xss=3</script> **not bold**"]


def test_slash_commands(browser, web_server):
    box = open_page(browser, web_server)
    box.send_keys("/temperature 1.5", Keys.ENTER)
    box.send_keys("/temperature", Keys.ENTER)
    assert "1.5" in texts(browser, ".message.console")[-1]
    box.send_keys("/topk 999", Keys.ENTER)
    assert "invalid" in texts(browser, ".message.console")[-1].lower()
    box.send_keys("/help", Keys.ENTER)
    assert "/topk" in texts(browser, ".message.console")[-1]
    assert texts(browser, ".message.user") == []  # commands never reach the server
    box.send_keys("/clear", Keys.ENTER)
    assert browser.find_elements(By.CSS_SELECTOR, ".message") == []
    assert box.get_attribute("value") == ""


def test_server_not_reachable(browser, web_server):
    box = open_page(browser, web_server)
    browser.execute_script("window.fetch = () => Promise.reject(new TypeError('Failed to fetch'));")
    assert browser.execute_script("return window.checkHealth();  // WebDriver awaits the promise") is False
    banner = browser.find_element(By.ID, "status-banner")
    assert banner.is_displayed() and "Server is not reachable" in banner.text

    box.send_keys("Hello", Keys.ENTER)
    (error,) = wait_for(browser, ".message.error")
    assert "Server is not reachable" in error.text
    # Nothing was answered, so the message goes back to the input for another try.
    assert browser.find_elements(By.CSS_SELECTOR, ".message.user, .message.assistant") == []
    assert box.get_attribute("value") == "Hello"


def test_request_body_stream_parsing_and_errors(browser, web_server):
    box = open_page(browser, web_server)
    browser.execute_script(FAKE_FETCH)
    box.send_keys("/temperature 1.5", Keys.ENTER)
    box.send_keys("/topk 0", Keys.ENTER)

    reply = sse({"token": "Hi "}, {"token": "😀"}, {"token": " 世界"}, {"token": " **bold**"}, {"done": True})
    browser.execute_script("window.__replies.push({sse: arguments[0]})", reply)
    box.send_keys("first", Keys.ENTER)
    (done,) = wait_for(browser, ".message.assistant.done")
    assert done.get_attribute("textContent") == "Hi 😀 世界 bold"
    assert texts(browser, ".message.assistant strong") == ["bold"]
    assert browser.execute_script("return window.__requests[0]") == {
        "messages": [{"role": "user", "content": "first"}],
        "temperature": 1.5,
        "top_k": 0,
        "max_tokens": 512,
    }

    # A non-200 answer: its JSON reason is shown and the message returns to the input.
    error = {"error": {"message": "prompt too long"}, "detail": "prompt too long"}
    browser.execute_script("window.__replies.push({status: 400, body: arguments[0]})", error)
    box.send_keys("second", Keys.ENTER)
    assert "prompt too long" in wait_for(browser, ".message.error")[-1].text
    assert box.get_attribute("value") == "second"
    assert texts(browser, ".message.user") == ["first"]
    sent = browser.execute_script("return window.__requests[1].messages")
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"] == "Hi 😀 世界 **bold**"  # the raw reply goes back, not the rendering

    # An error inside the stream: the partial reply stays, and the reason is shown.
    box.clear()
    browser.execute_script("window.__replies.push({sse: arguments[0]})", sse({"token": "partial"}, {"error": "engine failed"}))
    box.send_keys("third", Keys.ENTER)
    WebDriverWait(browser, 10).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.error")) == 2)
    assert "engine failed" in texts(browser, ".message.error")[-1]
    assert texts(browser, ".message.assistant.done")[-1] == "partial"


def test_edit_and_regenerate(browser, web_server):
    box = open_page(browser, web_server)
    browser.execute_script(FAKE_FETCH)
    for answer in ("A1", "A2"):
        browser.execute_script("window.__replies.push({sse: arguments[0]})", sse({"token": answer}, {"done": True}))
    box.send_keys("question", Keys.ENTER)
    wait_for(browser, ".message.assistant.done")

    browser.find_element(By.CSS_SELECTOR, ".message.assistant").click()  # regenerate
    WebDriverWait(browser, 10).until(lambda d: texts(d, ".message.assistant.done") == ["A2"])
    assert browser.execute_script("return window.__requests.map(r => r.messages.length)") == [1, 1]

    browser.find_element(By.CSS_SELECTOR, ".message.user").click()  # edit
    assert browser.find_elements(By.CSS_SELECTOR, ".message") == []
    assert box.get_attribute("value") == "question"

    # While a reply streams, clicks neither edit nor regenerate; Stop keeps what arrived.
    browser.execute_script("window.__replies.push({hang: true})")
    box.send_keys(Keys.ENTER)
    WebDriverWait(browser, 10).until(lambda d: texts(d, ".message.assistant") == ["wait"])
    browser.find_element(By.CSS_SELECTOR, ".message.user").click()
    assert texts(browser, ".message.user") == ["question"] and box.get_attribute("value") == ""
    stop = browser.find_element(By.ID, "send-button")
    assert stop.text == "Stop"
    stop.click()
    WebDriverWait(browser, 10).until(lambda d: texts(d, ".message.assistant.done") == ["wait"])
    assert stop.text == "Send" and texts(browser, ".message.error") == []
