"""Screenshot of the playground page (GET /) with a real model: start `spikelm serve`, drive headless Chromium
(Debian's `chromium` and `chromium-driver`, through Selenium), generate, hover one token, save a PNG.

    python eval/playground_screenshot.py --model runs/quickstart --output docs/playground.png
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from serving_pressure import Server  # eval/serving_pressure.py: the real server in a subprocess

from spikelm.errors import SpikeLMError
from spikelm.loading import require_saved_model


def chromium(profile, window="1280,1000"):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        raise SpikeLMError("no headless Chromium: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # a fresh profile and nothing that reaches out to the network
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={window}",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/quickstart", help="a saved spikelm directory")
    parser.add_argument("--prompt", default="ROMEO:\nBut soft, what light")
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--hover", type=int, default=12, help="the token whose counts the screenshot shows")
    parser.add_argument("--output", default="docs/playground.png")
    args = parser.parse_args()
    require_saved_model(args.model)
    from selenium.webdriver.common.action_chains import ActionChains

    profile = tempfile.mkdtemp(prefix="spikelm-chromium-")
    with Server(args.model, max_batch=4, threads=1) as server:
        driver = chromium(profile)
        try:
            driver.get(server.base + "/")
            fields = {"prompt": args.prompt, "max-tokens": args.max_tokens, "temperature": args.temperature,
                      "seed": args.seed}
            for field, value in fields.items():
                driver.find_element("id", field).clear()
                driver.find_element("id", field).send_keys(str(value))
            driver.find_element("id", "generate").click()
            time.sleep(0.2)
            deadline = time.monotonic() + 300
            while driver.execute_script("return document.body.dataset.state") != "idle":
                if time.monotonic() > deadline:
                    raise SpikeLMError("the page did not finish generating in 300 s")
                time.sleep(0.1)
            tokens = driver.find_elements("css selector", "#output .token")
            ActionChains(driver).move_to_element(tokens[min(args.hover, len(tokens) - 1)]).perform()
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(args.output)
            summary = {cell: driver.find_element("id", cell).text
                       for cell in ("sum-tokens", "sum-rate", "sum-joules", "sum-pj", "sum-ratio")}
            print(driver.find_element("id", "status").text)
            print(summary)
            print(f"wrote {args.output}")
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SpikeLMError as error:
        sys.exit(f"error: {error}")
