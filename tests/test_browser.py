"""The chat page in a real browser: Debian's chromium, headless, driven by Selenium through chromedriver,
against serve.py in this process on a loopback port. Skipped where chromium or chromedriver is missing,
except under CI (the CI environment variable set), where .ci/run installs them and a skip would hide a
failure."""

import importlib.util
import os
import shutil
import threading
import time

import pytest
import torch

import serve
from chat import render_prompt
from engine import Engine
from generate import load_for_inference
from helpers import CHAT_ANSWER

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def browser_or_skip():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package (requirements-dev.txt)")
    if missing:
        why = f"no {', '.join(missing)}: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and the browser test cannot run: {why}")
        pytest.skip(why)


def headless_chromium(width=1100, height=720):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def chat_in_the_page(url: str, message: str, screenshot: str | None = None, system: str | None = None,
                     temperature: float | None = None, timeout: float = 60) -> dict:
    """Open the page, type a message (and a system message), send it, and watch the answer stream in:
    returns the answer's text, the lengths it was seen at while streaming, and its chunk count."""
    from selenium.webdriver.common.by import By

    driver = headless_chromium()
    try:
        driver.set_page_load_timeout(timeout)
        driver.get(url)
        deadline = time.monotonic() + timeout
        while "connecting" in driver.find_element(By.ID, "model").text and time.monotonic() < deadline:
            time.sleep(0.02)
        if system is not None:
            driver.find_element(By.ID, "system").send_keys(system)
        if temperature is not None:  # a range input: set its value as a user's drag would
            driver.execute_script("const t = document.getElementById('temperature'); t.value = arguments[0];"
                                  "t.dispatchEvent(new Event('input'));", temperature)
        driver.find_element(By.ID, "input").send_keys(message)
        driver.find_element(By.ID, "send").click()
        seen, state = [], None
        while time.monotonic() < deadline:
            bubbles = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            if bubbles:
                text = bubbles[-1].find_element(By.CLASS_NAME, "text").text
                if not seen or seen[-1] != len(text):
                    seen.append(len(text))
                state = bubbles[-1].get_attribute("data-state")
                if state == "done":
                    break
            time.sleep(0.005)
        bubble = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.error")]
        if screenshot:
            driver.save_screenshot(screenshot)
        return {"text": bubble.find_element(By.CLASS_NAME, "text").text, "lengths": seen, "state": state,
                "chunks": int(bubble.get_attribute("data-chunks")), "errors": errors,
                "user": [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.user")]}
    finally:
        driver.quit()


@pytest.mark.slow
def test_the_chat_page_streams_an_answer_in_headless_chromium(certain, tmp_path):
    browser_or_skip()
    loaded = load_for_inference(certain.base, torch.device("cpu"), certain.lora)  # it answers "yes."
    # The tiny model answers in a few milliseconds; a pause before every forward pass (prefill and decode
    # steps) makes its answer arrive slowly enough for the page to be seen growing.
    loaded.model.register_forward_pre_hook(lambda module, inputs: time.sleep(0.08))
    with Engine(loaded, context_length=256, max_batch=4) as engine, \
            serve.BackgroundServer(serve.create_app(engine, loaded, serve.Settings("tiny-chat", 200))) as server:
        seen = chat_in_the_page(server.url + "/", "Say apple.", str(tmp_path / "page.png"), system="Be brief.",
                                temperature=0.0)
    assert seen["state"] == "done" and not seen["errors"], seen
    assert "Say apple." in seen["user"][0]
    assert seen["text"] == CHAT_ANSWER and seen["chunks"] == len(CHAT_ANSWER)  # one chunk per (byte) token
    growing = [n for n in seen["lengths"] if n > 0]
    assert len(set(growing)) >= 2, seen  # seen at two lengths at least: it streamed, not all at once
    assert os.path.getsize(tmp_path / "page.png") > 1000


def wait_for(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the page did not get there in time"
        time.sleep(0.01)


def answers(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def send(driver, text):
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "input").send_keys(text)
    driver.find_element(By.ID, "send").click()


def two_turns_keep_the_conversation(driver, loaded, requests):
    """Two messages at temperature 0: the second request carries the whole chat so far."""
    from selenium.webdriver.common.by import By

    wait_for(lambda: "chat model" in driver.find_element(By.ID, "model").text)
    driver.execute_script("const t = document.getElementById('temperature'); t.value = 0;"
                          "t.dispatchEvent(new Event('input'));")
    for turn, text in enumerate(("Say apple.", "Again.")):
        send(driver, text)
        wait_for(lambda: len(answers(driver)) == turn + 1
                 and answers(driver)[-1].get_attribute("data-state") == "done")
    first = answers(driver)[0].find_element(By.CLASS_NAME, "text").text
    assert first == CHAT_ANSWER and not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
    conversation = [{"role": "user", "content": "Say apple."}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "Again."}]
    assert requests[1].prompt == render_prompt(loaded.chat, conversation)  # the whole chat so far
    assert requests[1].sampling.temperature == 0 and requests[1].sampling.top_p == 0.9


def stop_cancels_the_answer(driver, engine, running, cancelled):
    """An answer held in progress, then Stop: the page says so and the server cancels it."""
    from selenium.webdriver.common.by import By

    running.clear()  # the next answer stays in progress until Stop is pressed
    send(driver, "Tell me a long story.")
    wait_for(lambda: len(answers(driver)) == 3 and engine.active == 1)
    assert "streaming" in answers(driver)[-1].get_attribute("class")
    driver.find_element(By.ID, "stop").click()
    wait_for(lambda: answers(driver)[-1].get_attribute("data-state") == "done")
    assert driver.find_element(By.ID, "status").text == "stopped"
    assert not driver.find_element(By.ID, "send").get_attribute("disabled")
    wait_for(lambda: len(cancelled) >= 1)  # the server saw the page leave and cancelled the answer
    assert len(cancelled) == 1
    running.set()
    wait_for(lambda: engine.active == 0)
    assert cancelled[0].generated == 0


def new_chat_starts_anew(driver, loaded, requests):
    """New chat empties the page, and the next request holds only the new message."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "new-chat").click()
    assert answers(driver) == [] and driver.find_elements(By.CSS_SELECTOR, ".msg.user") == []
    send(driver, "Say river.")
    wait_for(lambda: len(answers(driver)) == 1 and answers(driver)[-1].get_attribute("data-state") == "done")
    assert requests[-1].prompt == render_prompt(loaded.chat, [{"role": "user", "content": "Say river."}])


@pytest.mark.slow
def test_the_chat_page_keeps_the_conversation_stops_and_starts_anew(certain):
    browser_or_skip()
    loaded = load_for_inference(certain.base, torch.device("cpu"), certain.lora)
    running = threading.Event()  # cleared: the engine waits before its next forward pass
    running.set()
    loaded.model.register_forward_pre_hook(lambda module, inputs: None if running.wait(30) else None)  # None: inputs kept
    requests = []
    with Engine(loaded, context_length=256, max_batch=4) as engine:
        cancelled, cancel, submit = [], engine.cancel, engine.submit  # what the server asks of the engine
        engine.cancel = lambda ticket: (cancelled.append(ticket), cancel(ticket))[1]
        engine.submit = lambda request, emit: (requests.append(request), submit(request, emit))[1]
        app = serve.create_app(engine, loaded, serve.Settings("tiny-chat", 200))
        with serve.BackgroundServer(app) as server:
            driver = headless_chromium()
            try:
                driver.get(server.url + "/")
                two_turns_keep_the_conversation(driver, loaded, requests)
                stop_cancels_the_answer(driver, engine, running, cancelled)
                new_chat_starts_anew(driver, loaded, requests)
            finally:
                driver.quit()
