"""The playground at ``/`` (glmkit/serve/playground.py and its pages): HTTP answers (content types, the content
security policy, the API key, --no-playground, the layout route against masks.py, bad input) and the page itself in
Debian's chromium driven by Selenium, headless, against a live server on loopback with the bundled model."""

import dataclasses
import json
import shutil
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from glmkit.explain import explain
from glmkit.masks import prefix_lm_mask, sample_mask
from glmkit.serve.app import build_app
from glmkit.serve.http_common import ServerConfig
from glmkit.serve.playground import CSP, PAGES
from glmkit.serve.sampling import Limits
from glmkit.serve.scheduler import SchedulerConfig
from glmkit.serve.server import ServeOptions, load_state

from .conftest import LiveServer

TEXT = "In the beginning God created the [MASK] and the [MASK]."


@pytest.fixture(scope="module")
def bundled():
    """The bundled model behind a real uvicorn on loopback, loaded as ``glmkit serve`` loads it."""
    options = ServeOptions(
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1024, max_model_len=514),
        server=ServerConfig(limits=Limits(max_tokens=256, max_prompt_tokens=512)),
    )
    state = load_state(None, options, "float32")
    server = LiveServer(state)
    yield server
    server.stop()


def _client(state, **config) -> TestClient:
    """The same engines behind an app with other HTTP settings (no lifespan: the engines stay the fixture's)."""
    return TestClient(build_app(dataclasses.replace(state, config=dataclasses.replace(state.config, **config))))


def test_pages_have_their_types_and_the_policy(bundled):
    base = f"http://{bundled.url}"
    types = {"/": "text/html", "/playground/main.js": "text/javascript", "/playground/style.css": "text/css"}
    assert set(types) <= set(PAGES)
    for path, kind in types.items():
        r = httpx.get(base + path)
        assert r.status_code == 200 and r.headers["content-type"] == f"{kind}; charset=utf-8"
        assert r.headers["content-security-policy"] == CSP and r.headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP and "connect-src 'self'" in CSP
    page = httpx.get(base + "/").text
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere: the page works offline
    assert httpx.get(base + "/playground/nothing.js").status_code == 404


def test_api_key_guards_the_apis_not_the_page(bundled):
    client = _client(bundled.state, api_key="sesame")
    assert client.get("/").status_code == 200 and client.get("/playground/api.js").status_code == 200
    assert client.post("/playground/layout", json={"text": TEXT}).status_code == 401
    assert client.get("/v1/models").status_code == 401
    ok = client.post("/playground/layout", json={"text": TEXT}, headers={"Authorization": "Bearer sesame"})
    assert ok.status_code == 200


def test_no_playground_serves_no_page(bundled):
    client = _client(bundled.state, playground=False)
    assert client.get("/").status_code == 404 and client.get("/playground/main.js").status_code == 404
    assert client.post("/playground/layout", json={"text": TEXT}).status_code == 404
    assert client.get("/v1/models").status_code == 200


def test_layout_is_the_masks_module(bundled):
    tok = bundled.state.service.tok
    r = httpx.post(
        f"http://{bundled.url}/playground/layout", json={"text": TEXT + " [MASK]{the waters}", "span_length": 3}
    )
    assert r.status_code == 200
    got = r.json()
    ex = explain(TEXT + " [MASK]{the waters}", tok, 3)
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
        ({"text": "the " * 400 + "[MASK]"}, "exceed the model's context of 257 positions"),
    ],
)
def test_layout_bad_input(bundled, body, message):
    r = httpx.post(f"http://{bundled.url}/playground/layout", json=body)
    assert r.status_code == 400 and message in r.json()["error"]
    assert httpx.post(f"http://{bundled.url}/playground/layout", content=b"{not json").status_code == 400


def test_infill_streams_every_blank(bundled):
    body = {"prompt": TEXT, "max_tokens": 8, "temperature": 0}
    whole = httpx.post(f"http://{bundled.url}/v1/infill", json=body).json()
    events = []
    with httpx.stream("POST", f"http://{bundled.url}/v1/infill", json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    chunks, last = events[:-1], events[-1]
    assert {c["blank"] for c in chunks} == {0, 1} and all(c["object"] == "infill.chunk" for c in chunks)
    for k in (0, 1):  # each blank's streamed text is its span (the last event holds the spans whole)
        assert "".join(c["text"] for c in chunks if c["blank"] == k) == last["spans"][k]
    assert last["text"] == whole["text"] and last["spans"] == whole["spans"]


# ---- the page in a browser --------------------------------------------------------------------------------------


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


def _open(browser, server, tab):
    browser.get(f"http://{server.url}/")
    _wait(lambda: "model" in browser.find_element("id", "status").text, what="the status line")
    browser.find_element("id", f"tab-{tab}").click()


def _set(browser, id, value):
    element = browser.find_element("id", id)
    element.clear()
    element.send_keys(value)


def test_page_fills_two_blanks(bundled, browser):
    _open(browser, bundled, "fill")
    _set(browser, "fill-text", TEXT + " <b>bold</b>")
    _set(browser, "fill-max-tokens", "8")
    browser.find_element("id", "fill-run").click()
    result = _wait(lambda: browser.find_element("id", "fill-result").text, what="the filled text")
    expected = httpx.post(
        f"http://{bundled.url}/v1/infill", json={"prompt": TEXT + " <b>bold</b>", "max_tokens": 8, "temperature": 0}
    ).json()
    assert result == expected["text"].strip()
    marks = browser.find_elements("css selector", "#fill-output mark")
    assert [m.get_attribute("textContent") for m in marks] == expected["spans"] and len(marks) == 2
    # what the user typed is text, never markup
    assert not browser.find_elements("css selector", "#fill-output b")
    assert "<b>bold</b>" in browser.find_element("id", "fill-output").text


def test_page_says_what_went_wrong(bundled, browser):
    _open(browser, bundled, "fill")
    _set(browser, "fill-text", "no blank at all")
    browser.find_element("id", "fill-run").click()
    _wait(lambda: "no blank" in browser.find_element("id", "fill-error").text, what="the error")
    browser.find_element("id", "fill-text").clear()
    browser.find_element("id", "fill-run").click()
    _wait(lambda: "Type a text" in browser.find_element("id", "fill-error").text, what="the empty-text error")
    _set(browser, "fill-text", "the " * 600 + "[MASK]")
    browser.find_element("id", "fill-run").click()
    _wait(lambda: "exceed" in browser.find_element("id", "fill-error").text, what="the too-long error")
    assert browser.find_element("id", "fill-run").is_enabled()


def test_page_draws_the_masks_module(bundled, browser):
    _open(browser, bundled, "inside")
    text = "And God said, Let there be [MASK]{light}: and there was [MASK]."
    _set(browser, "inside-text", text)
    _set(browser, "inside-span-length", "2")
    browser.find_element("id", "inside-run").click()
    ex = explain(text, bundled.state.service.tok, 2)
    n = len(ex.sample)
    _wait(lambda: browser.find_element("id", "mask-glm").get_attribute("data-n") == str(n), what="the mask grid")
    mask = sample_mask(ex.sample)
    sep = ex.sample.sep
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


def test_page_metrics_are_compare_decodings(bundled, browser):
    from glmkit.generate.metrics import bleu, distinct_n, repetition_rate, self_bleu

    _open(browser, bundled, "compare")
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


def test_page_compares_strategies(bundled, browser):
    _open(browser, bundled, "compare")
    _set(browser, "compare-max-tokens", "6")
    _set(browser, "compare-samples", "2")
    browser.find_element("id", "compare-run").click()
    _wait(lambda: len(browser.find_elements("css selector", "#compare-table tr[data-strategy]")) == 4, 60, "4 rows")
    assert not browser.find_element("id", "compare-error").text
    for row in browser.find_elements("css selector", "#compare-table tr[data-strategy]"):
        ppl = row.find_element("css selector", "td[data-metric=perplexity]").text
        assert float(ppl) > 1, row.text


def test_page_stops_a_chat_stream(bundled, browser):
    engine = bundled.state.engine.engine
    step = engine.step

    def slow_step():  # a slow server: the stream is still running when the test presses Stop
        time.sleep(0.05)
        return step()

    engine.step = slow_step
    try:
        _open(browser, bundled, "chat")
        _set(browser, "chat-max-tokens", "256")
        _set(browser, "chat-input", "Who made the heaven and the earth?")
        browser.find_element("id", "chat-send").click()
        _wait(lambda: browser.find_element("css selector", ".message.assistant .content").text, what="a first token")
        browser.find_element("id", "chat-stop").click()
        _wait(lambda: "(stopped)" in browser.find_element("css selector", ".message.assistant").text, what="stop")
        shown = browser.find_element("css selector", ".message.assistant .content").text
        time.sleep(0.5)
        assert browser.find_element("css selector", ".message.assistant .content").text == shown
        assert shown and browser.find_element("id", "chat-send").is_enabled()
        _wait(lambda: not engine.has_unfinished_requests(), 10, "the server to drop the request")
    finally:
        engine.step = step
