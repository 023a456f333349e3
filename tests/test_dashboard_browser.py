"""The dashboard in a real browser (Debian's chromium) over a real 3-node cluster on loopback.

Each test saves a screenshot into a temporary folder (and into EXO_DASHBOARD_SCREENSHOTS when set,
which is how docs/dashboard/ was filled).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.select import Select

from tests.harness.browser import chromium, js, require_browser, wait_for
from tests.harness.cluster_harness import LoopbackCluster, NodeProcess, free_port, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def screenshot(driver: webdriver.Chrome, shots: Path, name: str) -> None:
    path = shots / f"{name}.png"
    assert driver.save_screenshot(str(path)), name
    if target := os.environ.get("EXO_DASHBOARD_SCREENSHOTS"):
        shutil.copy(path, Path(target) / path.name)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackCluster]:
    require_browser()
    with LoopbackCluster(tmp_path_factory.mktemp("cluster"), 3) as running:
        running.start_all()
        wait_until(
            lambda: (
                (state := running.converged())
                and len(state["nodes"]) == 3
                and all(node["status"] == "alive" for node in state["nodes"].values())
            ),
            60,
            "three alive nodes",
        )
        yield running


@pytest.fixture(scope="module")
def page(cluster: LoopbackCluster) -> Iterator[webdriver.Chrome]:
    with chromium() as driver:
        driver.get(cluster.nodes[0].url + "/")
        yield driver


def node_rows(driver: webdriver.Chrome) -> dict[str, str]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#nodes tbody tr[data-node]")
    return {row.get_attribute("data-node") or "": row.get_attribute("data-status") or "" for row in rows}


def test_three_nodes_and_the_master_are_shown(
    cluster: LoopbackCluster, page: webdriver.Chrome, shots: Path
) -> None:
    master = cluster.nodes[0].state()["master_node_id"]
    wait_for(page, lambda d: node_rows(d) == {f"node{i}": "alive" for i in range(3)}, 20, "three alive nodes")
    wait_for(
        page,
        lambda d: d.find_element(By.ID, "master").get_attribute("data-master") == master,
        10,
        "the master",
    )
    assert "term" in page.find_element(By.ID, "master").text
    assert page.find_element(By.ID, "live").text == "live"
    assert len(page.find_elements(By.CSS_SELECTOR, "#topology circle")) == 3
    assert page.find_elements(By.CSS_SELECTOR, "#events li"), "the event log's tail"
    link = "#nodes tr[data-node='node1'] td:last-child"
    wait_for(page, lambda d: " ms" in d.find_element(By.CSS_SELECTOR, link).text, 20, "node1's measured link")
    screenshot(page, shots, "topology")


def test_placing_an_instance_from_the_page_makes_it_ready(page: webdriver.Chrome, shots: Path) -> None:
    wait_for(page, lambda d: Select(d.find_element(By.ID, "place-model")).options, 10, "the model list")
    Select(page.find_element(By.ID, "place-model")).select_by_value("exo-tiny")
    count = page.find_element(By.ID, "place-min-nodes")
    count.clear()
    count.send_keys("3")
    page.find_element(By.ID, "preview-button").click()
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#previews li[data-nodes='3']"), 10, "previews")
    page.find_element(By.ID, "place-button").click()
    row = "#instances tbody tr[data-status='ready']"
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, row), 120, "a ready instance")
    stages = page.find_elements(By.CSS_SELECTOR, f"{row} .split span")
    assert len(stages) == 3, "the layer split, one part per node"
    assert page.find_element(By.ID, "place-error").text == ""
    screenshot(page, shots, "instance-ready")


def test_a_refused_placement_shows_its_reason_in_place(page: webdriver.Chrome) -> None:
    count = page.find_element(By.ID, "place-min-nodes")
    count.clear()
    count.send_keys("9")
    page.find_element(By.ID, "place-button").click()
    message = wait_for(page, lambda d: d.find_element(By.ID, "place-error").text, 20, "the refusal")
    assert "capacity" in message or "nodes" in message, message


def test_a_chat_streams_tokens_into_the_page(page: webdriver.Chrome, shots: Path) -> None:
    # Count the answer's text updates as they land: more than one means it streamed.
    js(
        page,
        """window.updates = 0;
        new MutationObserver(() => { window.updates += 1; })
          .observe(document.getElementById('chat-log'),
                   {subtree: true, characterData: true, childList: true});""",
    )
    wait_for(page, lambda d: Select(d.find_element(By.ID, "chat-model")).options, 10, "a chat model")
    box = page.find_element(By.ID, "chat-input")
    box.send_keys("Tell me about the tide and the moon.")
    box.send_keys(Keys.ENTER)
    answer = ".msg.assistant[data-done='true']"
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, answer), 120, "the answer")
    text = page.find_element(By.CSS_SELECTOR, f"{answer} .content").text
    stats = page.find_element(By.CSS_SELECTOR, f"{answer} .stats").text
    assert text.strip(), stats
    assert "TTFT" in stats and "tok/s" in stats, stats
    assert js(page, "return window.updates") > 3
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#trace .bar"), 10, "the trace's timeline")
    # The three stages' lanes (passes, the last one's sampling) and the hops between them.
    lanes = wait_for(
        page, lambda d: d.find_elements(By.CSS_SELECTOR, "#trace .stages .bar"), 10, "stage lanes"
    )
    assert len(lanes) == 4, [lane.text for lane in lanes]  # three stages and the hops
    assert len(page.find_elements(By.CSS_SELECTOR, "#trace .stages .fill.pass")) >= 3
    assert page.find_elements(By.CSS_SELECTOR, "#trace .stages .fill.sampling")
    assert page.find_elements(By.CSS_SELECTOR, "#trace .stages .fill.hop")
    assert len(page.find_elements(By.CSS_SELECTOR, "#trace .stage-figures tr")) == 4
    js(page, "document.getElementById('trace-section').scrollIntoView()")
    screenshot(page, shots, "trace")
    js(page, "document.getElementById('chat-section').scrollIntoView()")
    screenshot(page, shots, "chat")


def test_stop_ends_an_answer_early(page: webdriver.Chrome) -> None:
    box = page.find_element(By.ID, "chat-input")
    box.send_keys("And the sun?", Keys.ENTER)
    streaming = ".msg.assistant:last-child .stats"
    wait_for(page, lambda d: d.find_element(By.CSS_SELECTOR, streaming).text == "streaming…", 60, "tokens")
    page.find_element(By.ID, "chat-stop").click()
    stats = wait_for(
        page,
        lambda d: "stopped" in (text := d.find_element(By.CSS_SELECTOR, streaming).text) and text,
        20,
        "stop",
    )
    assert "TTFT" in stats, stats
    assert page.find_element(By.ID, "chat-stop").get_attribute("disabled") is not None
    assert page.find_element(By.ID, "chat-send").get_attribute("disabled") is None


# What a model with a thinking block and a tool call streams (the OpenAI/vLLM delta fields); the
# tiny test model makes neither, so the page's fetch is handed this stream instead.
SCRIPTED_STREAM = """
window.realFetch ??= window.fetch;
window.fetch = (url, init) => {
  if (url !== '/v1/chat/completions') return window.realFetch(url, init);
  const chunks = [
    {reasoning_content: 'The user wants '}, {reasoning_content: 'the weather.'},
    {content: 'Let me check.'},
    {tool_calls: [{index: 0, id: 'call_1', type: 'function',
                   function: {name: 'get_weather', arguments: ''}}]},
    {tool_calls: [{index: 0, function: {arguments: '{"city": '}}]},
    {tool_calls: [{index: 0, function: {arguments: '"Paris"}'}}]},
  ];
  const frame = (delta) => JSON.stringify({id: 'chatcmpl-scripted', choices: [{index: 0, delta}]});
  const lines = chunks.map((delta) => `data: ${frame(delta)}\\n\\n`);
  lines.push('data: [DONE]\\n\\n');
  const body = new ReadableStream({start(controller) {
    for (const line of lines) controller.enqueue(new TextEncoder().encode(line));
    controller.close();
  }});
  return Promise.resolve(new Response(body, {status: 200, headers: {'content-type': 'text/event-stream'}}));
};
"""


def test_reasoning_is_folded_and_tool_calls_are_shown_as_calls(page: webdriver.Chrome) -> None:
    js(page, SCRIPTED_STREAM)
    try:
        page.find_element(By.ID, "chat-input").send_keys("Weather in Paris?", Keys.ENTER)
        answer = ".msg.assistant[data-done='true']:last-child"
        wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, answer), 20, "the scripted answer")
        reasoning = page.find_element(By.CSS_SELECTOR, f"{answer} details")
        assert reasoning.is_displayed() and reasoning.get_attribute("open") is None, "folded away"
        assert "the weather" in (reasoning.get_attribute("textContent") or "")
        assert page.find_element(By.CSS_SELECTOR, f"{answer} .content").text == "Let me check."
        call = page.find_element(By.CSS_SELECTOR, f"{answer} .tool").text
        assert call == 'call get_weather({"city": "Paris"})', call
    finally:
        js(page, "window.fetch = window.realFetch")


def test_killing_a_node_turns_it_gone(cluster: LoopbackCluster, page: webdriver.Chrome, shots: Path) -> None:
    master = cluster.nodes[0].state()["master_node_id"]
    victim = next(node for node in cluster.nodes[1:] if node.name != master)
    victim.kill()
    wait_for(page, lambda d: node_rows(d).get(victim.name) == "gone", 15, f"{victim.name} gone")
    screenshot(page, shots, "node-gone")


def test_the_page_asks_for_the_api_key_once(tmp_path: Path, shots: Path) -> None:
    require_browser()
    node = NodeProcess(
        "keyed",
        tmp_path / "keyed",
        free_port(),
        free_port(),
        peers=[],
        extra_args=["--api-key", "open-sesame"],
    )
    try:
        node.start()
        wait_until(lambda: node.get("/health"), 60, "the node")
        with chromium(390, 844) as driver:  # a phone's viewport
            driver.get(node.url + "/")
            wait_for(
                driver, lambda d: d.find_element(By.ID, "key-dialog").is_displayed(), 10, "the key prompt"
            )
            assert not node_rows(driver), "nothing loads without the key"
            screenshot(driver, shots, "api-key")
            key = driver.find_element(By.ID, "key-input")
            key.send_keys("wrong", Keys.ENTER)
            wait_for(
                driver, lambda d: "refused" in d.find_element(By.ID, "key-error").text, 10, "the refusal"
            )
            key.send_keys("open-sesame", Keys.ENTER)
            wait_for(driver, lambda d: node_rows(d) == {"keyed": "alive"}, 20, "the node once unlocked")
            driver.refresh()  # kept in the browser: no second prompt
            wait_for(driver, lambda d: node_rows(d) == {"keyed": "alive"}, 20, "the node after a reload")
            assert not driver.find_element(By.ID, "key-dialog").is_displayed()
            screenshot(driver, shots, "phone")
    finally:
        node.kill()
