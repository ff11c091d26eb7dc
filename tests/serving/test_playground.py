"""The playground page (GET /) in a real browser: headless Chromium driven by Selenium against the real
server on 127.0.0.1 with a tiny random model. What the page shows is checked against what the API returns
to an ordinary client for the same request (seeded, so the engine produces the same tokens)."""

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from helpers import save_tiny_model
from serving_helpers import metric, running_server

pytestmark = pytest.mark.timeout(300)

API_KEY = "playground-secret"
ARTIFACTS = Path(os.environ.get("SPIKELM_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))
PROMPT = "ROMEO:\nWhat light"


def find_browser():
    """Debian's chromium and chromedriver (installed by .ci/run), or None with the reason."""
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        return None, ("no headless Chromium on this machine: install Debian's `chromium` and `chromium-driver` "
                      "(apt-get install -y chromium chromium-driver; .ci/run does it when it can)")
    return (browser, driver), None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("playground") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir):
    # no prefix cache: these tests compare the page's figures with the same request sent again, which would
    # otherwise resume from the first one's cached prompt state and cost less
    with running_server(model_dir, api_key=API_KEY, max_tokens=4096, max_batch=4, max_queue=4,
                        prefix_cache_bytes=0) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    found, reason = find_browser()
    if found is None:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = found
    profile = tempfile.mkdtemp(prefix="spikelm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # a new profile, and nothing that reaches out to the network (this machine has none: refused connections)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, to catch script errors
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# ================================================================ helpers


def js(driver, script, *args):
    return driver.execute_script(script, *args)


def open_page(driver, base, key=API_KEY):
    driver.get(base + "/")
    js(driver, "document.getElementById('api-key').value = arguments[0]", key)


def fill(driver, **fields):
    """Set the page's controls (by element id) as a user would leave them."""
    for field, value in fields.items():
        element = driver.find_element("id", field)
        if element.tag_name == "select":
            js(driver, "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('change'))",
               element, value)
        else:
            element.clear()
            element.send_keys(str(value))


def generate_and_wait(driver, timeout=120):
    driver.find_element("id", "generate").click()
    deadline = time.monotonic() + timeout
    time.sleep(0.1)
    while js(driver, "return document.body.dataset.state") != "idle":
        assert time.monotonic() < deadline, "the page did not finish generating"
        time.sleep(0.05)
    return driver.find_element("id", "status").text


def api_stream(base, path, body):
    """The same request from an ordinary client: (text, per-chunk energies, usage)."""
    text, energies, usage = [], [], None
    with httpx.stream("POST", base + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                text.append(choice["text"] if "text" in choice else (choice["delta"].get("content") or ""))
                energies.append(choice["energy"])
    return "".join(text), energies, usage


def health(base):
    return httpx.get(base + "/health", timeout=10).json()


# ================================================================ the page and its files


def test_page_is_served_without_a_key_and_loads_nothing_from_elsewhere(server):
    page = httpx.get(server + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(server + "/v1/models", timeout=10).status_code == 401  # the API still wants the key
    texts = [page.text]
    for name, kind in (("playground.js", "javascript"), ("playground.css", "text/css")):
        response = httpx.get(f"{server}/static/{name}", timeout=10)
        assert response.status_code == 200 and kind in response.headers["content-type"], name
        texts.append(response.text)
    urls = {url for text in texts for url in re.findall(r"https?://[^\s\"'`)]+", text)}
    assert urls <= {"http://www.w3.org/2000/svg"}, urls  # an SVG namespace is a name, not a download
    missing = httpx.get(server + "/static/nothing.js", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()


def test_page_follows_the_api_host_rule(server):
    """A page on another site whose name a browser resolves to this server (DNS rebinding) gets neither the
    page nor its script: the same Host check as the API."""
    port = server.rsplit(":", 1)[1]
    for path in ("/", "/static/playground.js"):
        rebound = httpx.get(server + path, headers={"Host": f"attacker.example:{port}"}, timeout=10)
        assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host", path
        assert httpx.get(server + path, headers={"Host": f"localhost:{port}"}, timeout=10).status_code == 200


# ================================================================ in the browser


def test_generation_shows_each_token_with_its_energy(server, browser):
    settings = {"max-tokens": 48, "temperature": 0.8, "top-p": 0.95, "seed": 1234}
    browser.get_log("browser")  # empties the console log: from here on it is this page's
    open_page(browser, server)
    fill(browser, mode="completion", prompt=PROMPT, **settings)
    status = generate_and_wait(browser)

    text, energies, usage = api_stream(server, "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 48, "temperature": 0.8, "top_p": 0.95, "seed": 1234, "stream": True,
        "stream_options": {"include_usage": True}})
    assert len(energies) == usage["completion_tokens"] > 8
    assert status.startswith(f"done: {usage['completion_tokens']} tokens"), status

    # text appeared, and it is the API's text
    shown = js(browser, "return document.getElementById('output').textContent")
    assert shown.strip() and shown == text
    # one shaded token per completion token, each with its own pJ
    tokens = browser.find_elements("css selector", "#output .token")
    assert len(tokens) == usage["completion_tokens"]
    shades = js(browser, "return [...document.querySelectorAll('#output .token')].map(t => t.style.backgroundColor)")
    assert all(shade.startswith("rgb") for shade in shades)
    assert len(set(shades)) > 1  # tokens cost different amounts, and the shading shows it
    assert [float(t.get_attribute("data-pj")) for t in tokens] == [e["pj"] for e in energies]
    assert browser.find_element("id", "legend-high").text.endswith("pJ")
    # one chart point per token, and the GPT-2 reference line
    assert len(browser.find_elements("css selector", "#chart circle.point")) == usage["completion_tokens"]
    assert len(browser.find_elements("css selector", "#chart polyline.gpt2")) == 1
    # the summary is the usage's
    summary = {cell: browser.find_element("id", cell) for cell in ("sum-tokens", "sum-joules", "sum-pj", "sum-ratio")}
    assert summary["sum-tokens"].text == str(usage["completion_tokens"])
    assert float(summary["sum-joules"].get_attribute("data-value")) == usage["energy_joules"]
    shown_joules, unit = summary["sum-joules"].text.split()
    scale = {"J": 1, "mJ": 1e-3, "µJ": 1e-6, "nJ": 1e-9, "pJ": 1e-12}[unit]
    assert float(shown_joules) * scale == pytest.approx(usage["energy_joules"], rel=1e-3)
    assert float(summary["sum-pj"].get_attribute("data-value")) == usage["energy_pj_per_token"]
    assert float(summary["sum-ratio"].get_attribute("data-value")) == usage["energy_ratio_to_gpt2"]
    assert float(browser.find_element("id", "sum-rate").get_attribute("data-value")) > 0
    # and every further per-token figure the usage reports (memory traffic, other references) gets a row
    further = {match[1]: value for key, value in usage.items()
               if (match := re.fullmatch(r"energy_(.+)_pj_per_token", key)) and match[1] != "gpt2" and value > 0}
    rows = browser.find_elements("css selector", "#sum-extra td")
    assert [float(cell.get_attribute("data-value")) for cell in rows] == list(further.values())
    # and the other models' compute (not memory traffic, not compute + memory) is drawn as a line each
    others = [name for name in further if name not in ("memory", "total") and not name.endswith("_total")]
    assert len(browser.find_elements("css selector", "#chart line.ref")) == len(others)
    # the last token's firing rate by layer, as bars
    bars = browser.find_elements("css selector", "#layers rect.bar")
    last = energies[-1]["firing_rate_per_layer"]
    assert [b.get_attribute("data-layer") for b in bars] == list(last)
    assert [float(b.get_attribute("data-rate")) for b in bars] == list(last.values())
    # hovering a token shows its pJ, ACs, MACs and firing rate
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).move_to_element(tokens[3]).perform()
    tooltip = browser.find_element("id", "tooltip")
    assert tooltip.is_displayed()
    energy = energies[3]
    for expected in (f"{round(energy['pj']):,} pJ", f"{energy['ac']:,} ACs", f"{energy['mac']:,} MACs",
                     f"firing rate {energy['firing_rate']:.4f}"):
        assert expected in tooltip.text, (expected, tooltip.text)
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors  # no script error, no refused resource (the page's CSP allows only its own files)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "playground.png"))


def test_chat_mode_streams_from_chat_completions(server, browser):
    open_page(browser, server)
    fill(browser, mode="chat", system="You are terse.", prompt="Speak, Juliet.", **{"max-tokens": 12, "seed": 7})
    status = generate_and_wait(browser)
    assert status.startswith("done: "), status
    text, energies, usage = api_stream(server, "/v1/chat/completions", {
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Speak, Juliet."}],
        "max_tokens": 12, "temperature": 0.8, "top_p": 1, "seed": 7, "stream": True,
        "stream_options": {"include_usage": True}})
    assert js(browser, "return document.getElementById('output').textContent") == text
    assert len(browser.find_elements("css selector", "#output .token")) == usage["completion_tokens"]
    assert float(browser.find_element("id", "sum-joules").get_attribute("data-value")) == usage["energy_joules"]


def test_stop_ends_a_long_generation_and_frees_the_slot(server, browser):
    cancelled = metric(server, "spikelm_cancelled_sequences_total")
    open_page(browser, server)
    fill(browser, mode="completion", prompt=PROMPT, **{"max-tokens": 4096, "temperature": 0})
    browser.find_element("id", "generate").click()
    deadline = time.monotonic() + 60
    while len(browser.find_elements("css selector", "#output .token")) < 5:
        assert time.monotonic() < deadline, "no tokens arrived"
        time.sleep(0.05)
    assert health(server)["active_sequences"] == 1
    browser.find_element("id", "stop-button").click()
    deadline = time.monotonic() + 30
    while js(browser, "return document.body.dataset.state") != "idle":
        assert time.monotonic() < deadline, "Stop did not end the request"
        time.sleep(0.05)
    status = browser.find_element("id", "status").text
    shown = len(browser.find_elements("css selector", "#output .token"))
    assert status == f"stopped after {shown} tokens" and shown < 4096
    while health(server)["active_sequences"] != 0:  # the server noticed the closed connection
        assert time.monotonic() < deadline, "the server kept generating for a stopped request"
        time.sleep(0.05)
    assert metric(server, "spikelm_cancelled_sequences_total") == cancelled + 1  # dropped, not finished
    # what was shown before Stop is still summed up, from the chunks that came
    assert browser.find_element("id", "sum-tokens").text == f"{shown:,}"


def test_errors_are_readable(server, browser):
    open_page(browser, server, key="")
    fill(browser, mode="completion", prompt=PROMPT, **{"max-tokens": 8})
    status = generate_and_wait(browser)
    assert status.startswith("error 401: missing or wrong API key") and "API key field" in status, status
    open_page(browser, server)
    fill(browser, mode="completion", prompt=PROMPT, **{"max-tokens": 5000})
    status = generate_and_wait(browser)
    assert status == "error 400: max_tokens is 5000, over this server's limit of 4096", status
    assert "error" in browser.find_element("id", "status").get_attribute("class")


def test_busy_server_answer_names_its_retry_after(model_dir, browser):
    with running_server(model_dir, api_key=API_KEY, max_tokens=4096, max_batch=1, max_queue=0,
                        retry_after_s=3) as base:
        body = {"prompt": PROMPT, "max_tokens": 4096, "temperature": 0, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as hog:  # takes the only slot
            lines = hog.iter_lines()  # held: a dropped iterator would close the connection
            next(lines)
            deadline = time.monotonic() + 10  # the first token comes out just before its sequence joins the batch
            while health(base)["active_sequences"] != 1:
                assert time.monotonic() < deadline, "the long request did not take the slot"
                time.sleep(0.02)
            open_page(browser, base)
            fill(browser, mode="completion", prompt=PROMPT, **{"max-tokens": 8})
            status = generate_and_wait(browser)
        assert status.startswith("error 503: the server is busy") and status.endswith("retry after 3 s)"), status


# ================================================================ the stream data the page draws


def test_stream_chunks_carry_layer_firing_rates_and_the_gpt2_reference(server, model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from spikelm.energy import EnergyCounter, Prices, count_energy, gpt2_reference_counts

    prompt_ids = [5, 17, 3, 30, 22, 9, 11]
    _, energies, usage = api_stream(server, "/v1/completions", {
        "prompt": prompt_ids, "max_tokens": 10, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}})
    assert len(energies) == usage["completion_tokens"] == 10

    # the first chunk's forward pass is the prompt's: its rates by layer are what count_energy counts for it
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(torch.float64).eval()
    with torch.inference_mode(), count_energy(model, EnergyCounter()) as counter:
        model(input_ids=torch.tensor([prompt_ids]), use_cache=True, logits_to_keep=1)
    expected = counter.report()["firing_rate_per_layer"]
    assert list(energies[0]["firing_rate_per_layer"]) == list(expected)
    assert len([layer for layer in expected if layer.startswith("layers.")]) == model.config.num_hidden_layers
    assert energies[0]["firing_rate_per_layer"] == pytest.approx(expected, rel=1e-12)
    for energy in energies[1:]:
        assert list(energy["firing_rate_per_layer"]) == list(expected)
        assert all(0 <= rate <= 1 for rate in energy["firing_rate_per_layer"].values())

    # GPT-2's share of each forward pass: the prompt's (one logit), then one token's at each position; they add
    # up to the usage's
    P = len(prompt_ids)
    gpt2_pj = lambda tokens, context: Prices().compute_pj(gpt2_reference_counts(  # noqa: E731
        model.config, tokens, logits=1, context=context)["counts"])  # its MACs and its norms' and residual ACs
    assert energies[0]["gpt2_pj"] == gpt2_pj(P, P * (P + 1) // 2)
    assert energies[3]["gpt2_pj"] == gpt2_pj(1, P + 3)
    assert energies[3]["gpt2_pj"] < energies[4]["gpt2_pj"]  # softmax attention's cost grows with the context
    total = sum(e["gpt2_pj"] for e in energies)
    assert total == pytest.approx(usage["energy_gpt2_pj_per_token"] * usage["completion_tokens"], rel=1e-12)
