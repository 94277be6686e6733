"""Screenshots of the playground's tabs (docs/playground-*.png): the bundled model behind ``glmkit serve``'s app on
loopback, Debian's chromium driven by Selenium, headless, as tests/serve/test_playground.py drives it.

    python scripts/playground_screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time
from pathlib import Path

import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from glmkit.serve.app import build_app
from glmkit.serve.scheduler import SchedulerConfig
from glmkit.serve.server import ServeOptions, load_state


def start_server() -> tuple[uvicorn.Server, str]:
    state = load_state(None, ServeOptions(scheduler=SchedulerConfig(max_num_seqs=8, max_model_len=514)), "float32")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/"


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "chromedriver"))


def wait(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the page did not get there in time")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    server, url = start_server()
    b = browser()
    by_id = b.find_element
    try:
        b.get(url)
        wait(lambda: "model" in by_id("id", "status").text)
        by_id("id", "fill-run").click()
        wait(lambda: by_id("id", "fill-result").text)
        b.save_screenshot(str(args.out / "playground-fill.png"))
        by_id("id", "tab-inside").click()
        time.sleep(0.5)
        b.save_screenshot(str(args.out / "playground-inside.png"))
        by_id("id", "tab-compare").click()
        by_id("id", "compare-run").click()
        wait(lambda: len(b.find_elements("css selector", "#compare-table tr[data-strategy]")) == 4, 120)
        b.save_screenshot(str(args.out / "playground-compare.png"))
        by_id("id", "tab-chat").click()
        by_id("id", "chat-input").send_keys("Who made the heaven and the earth?")
        by_id("id", "chat-send").click()
        wait(lambda: by_id("id", "chat-send").is_enabled() and b.find_elements("css selector", ".message.assistant"))
        b.save_screenshot(str(args.out / "playground-chat.png"))
    finally:
        b.quit()
        server.should_exit = True
    print(f"wrote {args.out}/playground-{{fill,inside,compare,chat}}.png")


if __name__ == "__main__":
    main()
