"""The playground at ``/`` (glmkit/serve/playground.py and its pages): HTTP answers (content types, the content
security policy, the API key, --no-playground, the layout route against masks.py, bad input, /v1/infill streaming
every blank) on the tiny test model, and the page itself in Debian's chromium driven by Selenium, headless, against
``glmkit serve`` running in its own process on loopback with the bundled model."""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from glmkit.bundled import BUNDLED_MODEL
from glmkit.explain import explain
from glmkit.masks import prefix_lm_mask, sample_mask
from glmkit.serve import server as serve_command
from glmkit.serve.playground import CSP, PAGES
from glmkit.tokenizer import load_tokenizer

from .conftest import LiveServer, make_state

TEXT = "the king said unto them [MASK] and see [MASK] the lord hath done"


@pytest.fixture(scope="module")
def keyed(model_and_tokenizer):
    server = LiveServer(make_state(*model_and_tokenizer, api_key="sesame"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def no_playground(model_and_tokenizer):
    server = LiveServer(make_state(*model_and_tokenizer, playground=False))
    yield server
    server.stop()


def test_pages_have_their_types_and_the_policy(live_server):
    base = f"http://{live_server.url}"
    types = {"/": "text/html", "/playground/main.js": "text/javascript", "/playground/style.css": "text/css"}
    assert set(types) <= set(PAGES)
    for path, kind in types.items():
        r = httpx.get(base + path)
        assert r.status_code == 200 and r.headers["content-type"] == f"{kind}; charset=utf-8"
        assert r.headers["content-security-policy"] == CSP and r.headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP and "connect-src 'self'" in CSP
    for file in PAGES.values():  # nothing from elsewhere: the page works offline
        assert "http://" not in file.read_text() and "https://" not in file.read_text(), file.name
    assert httpx.get(base + "/playground/nothing.js").status_code == 404


def test_api_key_guards_the_apis_not_the_page(keyed):
    base = f"http://{keyed.url}"
    assert httpx.get(base + "/").status_code == 200 and httpx.get(base + "/playground/api.js").status_code == 200
    assert httpx.post(base + "/playground/layout", json={"text": TEXT}).status_code == 401
    assert httpx.get(base + "/v1/models").status_code == 401
    ok = httpx.post(base + "/playground/layout", json={"text": TEXT}, headers={"Authorization": "Bearer sesame"})
    assert ok.status_code == 200


def test_no_playground_serves_no_page(no_playground):
    base = f"http://{no_playground.url}"
    assert httpx.get(base + "/").status_code == 404 and httpx.get(base + "/playground/main.js").status_code == 404
    assert httpx.post(base + "/playground/layout", json={"text": TEXT}).status_code == 404
    assert httpx.get(base + "/v1/models").status_code == 200
    parser = argparse.ArgumentParser()
    serve_command.configure(parser)
    assert parser.parse_args([]).playground and not parser.parse_args(["--no-playground"]).playground


def test_page_is_served_while_the_model_loads():
    from fastapi.testclient import TestClient

    from glmkit.serve.app import build_app
    from glmkit.serve.http_common import ServerConfig

    client = TestClient(build_app(None, ServerConfig(api_key="sesame")))
    assert client.get("/").status_code == 200  # the page says "starting" (its /v1/models call gets 503)
    assert client.post("/playground/layout", json={"text": TEXT}).status_code == 401
    auth = {"Authorization": "Bearer sesame"}
    assert client.post("/playground/layout", json={"text": TEXT}, headers=auth).status_code == 503


def test_layout_is_the_masks_module(live_server):
    text = TEXT + " [MASK]{the land}"
    r = httpx.post(f"http://{live_server.url}/playground/layout", json={"text": text, "span_length": 3})
    assert r.status_code == 200
    got = r.json()
    ex = explain(text, live_server.state.service.tok, 3)
    s = ex.sample
    assert got["tokens"] == ex.labels and got["ids"] == s.tokens and got["sep"] == s.sep
    assert got["position_ids"] == s.position_ids and got["block_position_ids"] == s.block_position_ids
    n = len(s)
    expected = {"glm": sample_mask(s), "gpt": prefix_lm_mask(0, n)[0, 0], "bert": torch.ones(n, n, dtype=torch.bool)}
    for name, mask in expected.items():
        assert torch.tensor([[c == "1" for c in row] for row in got["masks"][name]]).equal(mask), name
    assert got["tokens"][s.sep :].count("▢") == 6  # two blanks without a span, three placeholders each


@pytest.mark.parametrize(
    "body, message",
    [
        ({"text": ""}, "text: expected a non-empty string"),
        ({"text": "no blank here"}, "no blank found"),
        ({"text": TEXT, "span_length": 0}, "span_length"),
        ({"text": ["a list"]}, "text: expected"),
        ({"text": "the " * 100 + "[MASK]"}, "exceed the model's context of 65 positions"),
        ({"text": "the [MASK]", "span_length": 64}, "positions in one span exceed the model's context"),
    ],
)
def test_layout_bad_input(live_server, body, message):
    r = httpx.post(f"http://{live_server.url}/playground/layout", json=body)
    assert r.status_code == 400 and message in r.json()["error"]
    assert httpx.post(f"http://{live_server.url}/playground/layout", content=b"{not json").status_code == 400


def test_infill_streams_every_blank(live_server):
    body = {"prompt": TEXT, "max_tokens": 8, "temperature": 0}
    whole = httpx.post(f"http://{live_server.url}/v1/infill", json=body).json()
    events = []
    with httpx.stream("POST", f"http://{live_server.url}/v1/infill", json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    chunks, last = events[:-1], events[-1]
    assert {c["blank"] for c in chunks} == {0, 1} and all(c["object"] == "infill.chunk" for c in chunks)
    for k in (0, 1):  # each blank's streamed text is its span (the last event holds the spans whole)
        assert "".join(c["text"] for c in chunks if c["blank"] == k) == last["spans"][k]
    assert last["text"] == whole["text"] and last["spans"] == whole["spans"] and last["object"] == "infill"


# ---- the page in a browser --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served():
    """``glmkit serve`` (the bundled model) in a process of its own on a free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "glmkit", "serve", "--port", str(port), "--threads", "1", "--max-num-seqs", "4"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process.url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{process.url}/v2/health/ready").status_code == 200
        except httpx.TransportError:
            return process.poll() is not None  # exited: the assert below says so

    try:
        _wait(ready, 180, "glmkit serve to load the bundled model")
        assert process.poll() is None, "glmkit serve exited"
        yield process
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "Debian's chromium and chromium-driver are needed (.ci/run installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    b = webdriver.Chrome(options=options, service=Service(driver))
    b.implicitly_wait(0)
    yield b
    b.quit()


def _wait(condition, timeout=30.0, what="the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _open(browser, served, tab):
    browser.get(f"{served.url}/")
    _wait(lambda: "model" in browser.find_element("id", "status").text, what="the status line")
    browser.find_element("id", f"tab-{tab}").click()


def _set(browser, id, value):
    element = browser.find_element("id", id)
    element.clear()
    if len(value) > 100:  # typed key by key, a long text takes seconds
        browser.execute_script("arguments[0].value = arguments[1]", element, value)
    else:
        element.send_keys(value)


BIBLE = "In the beginning God created the [MASK] and the [MASK]."


def test_page_fills_two_blanks(served, browser):
    _open(browser, served, "fill")
    _set(browser, "fill-text", BIBLE + " <b>bold</b>")
    _set(browser, "fill-max-tokens", "8")
    browser.find_element("id", "fill-run").click()
    result = _wait(lambda: browser.find_element("id", "fill-result").get_attribute("textContent"), what="the text")
    body = {"prompt": BIBLE + " <b>bold</b>", "max_tokens": 8, "temperature": 0}
    expected = httpx.post(f"{served.url}/v1/infill", json=body).json()
    assert result == expected["text"]
    marks = browser.find_elements("css selector", "#fill-output mark")
    assert [m.get_attribute("textContent") for m in marks] == expected["spans"] and len(marks) == 2
    assert all(m.get_attribute("class") == "span" for m in marks)
    # what the user typed is text, never markup
    assert not browser.find_elements("css selector", "#fill-output b")
    assert "<b>bold</b>" in browser.find_element("id", "fill-output").text
    # Inside the model followed the fill: the blanks carry their spans
    assert browser.find_element("id", "inside-text").get_attribute("value").count("[MASK]{") == 2


def test_page_says_what_went_wrong(served, browser):
    _open(browser, served, "fill")
    _set(browser, "fill-text", "no blank at all")
    browser.find_element("id", "fill-run").click()
    _wait(lambda: "no blank" in browser.find_element("id", "fill-error").text, what="the no-blank error")
    browser.find_element("id", "fill-text").clear()
    browser.find_element("id", "fill-run").click()
    _wait(lambda: "Type a text" in browser.find_element("id", "fill-error").text, what="the empty-text error")
    _set(browser, "fill-text", "the " * 600 + "[MASK]")
    browser.find_element("id", "fill-run").click()
    _wait(lambda: "exceed" in browser.find_element("id", "fill-error").text, what="the too-long error")
    browser.find_element("id", "tab-inside").click()
    _set(browser, "inside-text", "the " * 600 + "[MASK]")
    browser.find_element("id", "inside-run").click()
    _wait(lambda: "exceed the model's context" in browser.find_element("id", "inside-error").text, what="context")
    assert browser.find_element("id", "fill-run").is_enabled() and browser.find_element("id", "inside-run").is_enabled()


def test_page_draws_the_masks_module(served, browser):
    _open(browser, served, "inside")
    text = "And God said, Let there be [MASK]{light}: and there was [MASK]."
    _set(browser, "inside-text", text)
    _set(browser, "inside-span-length", "2")
    browser.find_element("id", "inside-run").click()
    ex = explain(text, load_tokenizer(BUNDLED_MODEL), 2)
    n, sep = len(ex.sample), ex.sample.sep
    _wait(lambda: browser.find_element("id", "mask-glm").get_attribute("data-n") == str(n), what="the mask grid")
    mask = sample_mask(ex.sample)
    cells = [(0, n - 1), (sep - 1, sep - 1), (sep, sep), (sep, sep + 1), (n - 1, 0), (n - 1, n - 1), (sep + 1, sep)]
    read = """const c = document.getElementById(arguments[0]); const s = Number(c.dataset.cell);
        const px = c.getContext('2d').getImageData(arguments[2] * s + 1, arguments[1] * s + 1, 1, 1).data;
        return px[2] > 150 && px[0] < 100;"""  # dark blue: visible
    for i, j in cells:
        assert browser.execute_script(read, "mask-glm", i, j) == bool(mask[i, j]), (i, j)
        assert browser.execute_script(read, "mask-gpt", i, j) == (j <= i), (i, j)
        assert browser.execute_script(read, "mask-bert", i, j)
    rows = browser.find_elements("css selector", "#part-b tr")
    assert len(rows) == 1 + n - sep  # a header, then Part B
    cells = rows[1].find_elements("tag name", "td")
    assert [c.text for c in cells[2:]] == [str(ex.sample.position_ids[sep]), str(ex.sample.block_position_ids[sep])]


def test_page_metrics_are_compare_decodings(served, browser):
    from glmkit.generate.metrics import bleu, distinct_n, repetition_rate, self_bleu

    _open(browser, served, "compare")
    g = torch.Generator().manual_seed(0)
    texts = [
        torch.randint(0, 6, (int(torch.randint(3, 14, (1,), generator=g)),), generator=g).tolist() for _ in range(4)
    ]
    texts[1] = texts[0][:5] + texts[1]
    got = browser.execute_async_script(
        """const [texts, done] = arguments;
        import('/playground/metrics.js').then((m) => done([m.distinctN(texts, 1), m.distinctN(texts, 2),
            m.selfBleu(texts), m.repetitionRate(texts), m.bleu(texts[0], texts.slice(1))]));""",
        texts,
    )
    want = [
        distinct_n(texts, 1),
        distinct_n(texts, 2),
        self_bleu(texts),
        repetition_rate(texts),
        bleu(texts[0], texts[1:]),
    ]
    assert got == pytest.approx(want, rel=1e-12)


def test_page_compares_strategies(served, browser):
    _open(browser, served, "compare")
    _set(browser, "compare-max-tokens", "6")
    _set(browser, "compare-samples", "2")
    browser.find_element("id", "compare-run").click()
    rows = "#compare-table tr[data-strategy]"
    _wait(lambda: len(browser.find_elements("css selector", rows)) == 4, 60, "four strategies")
    assert not browser.find_element("id", "compare-error").text
    metric = {
        row.get_attribute("data-strategy"): {
            td.get_attribute("data-metric"): td.text for td in row.find_elements("css selector", "td[data-metric]")
        }
        for row in browser.find_elements("css selector", rows)
    }
    assert set(metric) == {"greedy", "beam-4", "top-p-0.9", "temp-1.3"}
    assert all(float(m["perplexity"]) > 1 and float(m["mean_length"]) > 0 for m in metric.values()), metric
    assert metric["greedy"]["self_bleu_4"] == "1.000"  # two greedy samples of one prompt are the same text


def test_page_stops_a_chat_stream(served, browser):
    """Greedy on this prompt runs to max tokens (checked first), so Stop lands mid-stream: the page keeps a strict
    prefix of the whole answer, says it stopped, and stays usable."""
    question = "Who made the heaven and the earth?"
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 256, "temperature": 0}
    whole = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    assert whole["finish_reason"] == "length"
    _open(browser, served, "chat")
    _set(browser, "chat-max-tokens", "256")
    _set(browser, "chat-temperature", "0")
    _set(browser, "chat-input", question)
    browser.find_element("id", "chat-send").click()
    content = "#chat-log .message.assistant .content"
    _wait(lambda: browser.find_element("css selector", content).get_attribute("textContent"), what="a first token")
    browser.find_element("id", "chat-stop").click()
    _wait(lambda: "(stopped)" in browser.find_element("css selector", ".message.assistant").text, what="the stop")
    shown = browser.find_element("css selector", content).get_attribute("textContent")
    time.sleep(0.5)
    assert browser.find_element("css selector", content).get_attribute("textContent") == shown
    assert whole["message"]["content"].startswith(shown) and len(shown) < len(whole["message"]["content"])
    assert browser.find_element("id", "chat-send").is_enabled() and not browser.find_element("id", "chat-error").text


def test_page_asks_for_the_key(keyed, browser):
    browser.get(f"http://{keyed.url}/")
    _wait(lambda: browser.find_element("id", "key-form").is_displayed(), what="the key form")
    assert "API key" in browser.find_element("id", "status").text
    _set(browser, "key", "sesame")
    browser.find_element("css selector", "#key-form button").click()
    _wait(lambda: "with your API key" in browser.find_element("id", "status").text, what="the status with the key")
    assert browser.execute_script("return sessionStorage.getItem('glmkit-api-key')") == "sesame"
    assert browser.execute_script("return localStorage.length") == 0 and browser.get_cookies() == []
    browser.find_element("id", "tab-inside").click()
    browser.find_element("id", "inside-run").click()  # an API call carries the key
    _wait(lambda: browser.find_element("id", "mask-glm").get_attribute("data-n"), what="the layout")
    browser.find_element("id", "forget-key").click()
    _wait(lambda: browser.find_element("id", "key-form").is_displayed(), what="the key form again")
    assert browser.execute_script("return sessionStorage.getItem('glmkit-api-key')") is None


def test_page_survives_the_server_going_away(served, browser):
    """The server killed while a blank fills (this runs last: the module's server is gone after it)."""
    _open(browser, served, "fill")
    _set(browser, "fill-text", "In the beginning God created [gMASK]")
    _set(browser, "fill-max-tokens", "256")  # greedy loops on this model: far longer than the kill takes
    browser.find_element("id", "fill-run").click()
    _wait(lambda: browser.find_element("css selector", "#fill-output mark").text != "[gMASK]", what="a token")
    os.kill(served.pid, signal.SIGKILL)
    error = _wait(lambda: browser.find_element("id", "fill-error").text, what="the error")
    assert "lost mid-stream" in error or "ended before the server finished" in error, error
    assert not browser.find_element("id", "fill-result").text
    browser.find_element("id", "fill-run").click()  # still usable: the next try says the server is gone
    _wait(lambda: "cannot be reached" in browser.find_element("id", "fill-error").text, what="unreachable")
