"""The web UI: served by the API's process with no outside resources; its JSON lists runs with their loss
curves and never turns a name into a path; in headless Chromium (Debian's package) a chat message gets the
served model's answer next to the base's, and a screenshot is kept as a test artefact."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from trained_runs import adapter_runs

from tunelab.runs import read_metrics
from tunelab.serve.app import ServeSettings
from tunelab.serve.server import BackgroundServer, build_app

ARTIFACTS = Path(os.environ.get("TUNELAB_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    return adapter_runs(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def server(runs: dict[str, Path]):  # noqa: ANN201
    root = runs["cats"].parent
    app = build_app([runs["cats"], runs["dogs"]], ServeSettings(max_tokens_limit=64, runs_root=root), device="cpu")
    with BackgroundServer(app) as running:
        yield running


def test_the_page_is_served_with_nothing_from_outside(server: BackgroundServer) -> None:
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "<title>tunelab</title>" in page.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text)  # no CDN, no remote font or script


def test_runs_api_lists_runs_with_their_curves(server: BackgroundServer, runs: dict[str, Path]) -> None:
    listed = httpx.get(f"{server.url}/ui/api/runs").json()["runs"]
    assert {r["name"]: r["served"] for r in listed} == {"cats": True, "dogs": True, "owls": False}
    detail = httpx.get(f"{server.url}/ui/api/runs/owls").json()
    expected = [[m["step"], m["loss"]] for m in read_metrics(runs["owls"]) if m["kind"] == "train"]
    assert detail["curves"]["train"] == expected and len(expected) == 6
    assert detail["eval"]["tuned"]["loss"] > 0 and detail["config"]["technique"]["name"] == "lora"


@pytest.mark.parametrize("name", ["..", "../owls", "owls%2F..%2F..", "nope"])
def test_a_run_name_is_never_a_path(server: BackgroundServer, name: str) -> None:
    response = httpx.get(f"{server.url}/ui/api/runs/{name}")
    assert response.status_code == 404 and "error" in response.json()


def test_chat_in_headless_chromium(server: BackgroundServer) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make test installs it when it runs as root); "
                    "the browser check needs it")
    playwright = pytest.importorskip("playwright.sync_api")
    expected = {name: httpx.post(f"{server.url}/v1/chat/completions", timeout=30, json={
        "model": name, "messages": [{"role": "user", "content": "say something 3"}], "max_tokens": 16}).json()
        ["choices"][0]["message"]["content"] for name in ("dogs", "base")}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(server.url + "/")
            page.wait_for_function("document.querySelectorAll('#model option').length === 3")
            page.select_option("#model", "dogs")
            assert page.is_checked("#side-by-side")
            page.fill("#max-tokens", "16")
            page.fill("#message", "say something 3")
            page.click("#send")
            page.wait_for_selector("#chat-main .msg.assistant[data-done=true]", timeout=90000)
            page.wait_for_selector("#chat-base .msg.assistant[data-done=true]", timeout=90000)
            assert page.inner_text("#chat-main .msg.assistant") == expected["dogs"].strip()
            assert page.inner_text("#chat-base .msg.assistant") == expected["base"].strip()
            page.screenshot(path=str(ARTIFACTS / "ui-chat.png"), full_page=True)
            page.click("nav button[data-tab=runs]")
            page.click("#runs-table tr[data-run=owls]")
            page.wait_for_selector("#run-detail svg.chart")
            page.screenshot(path=str(ARTIFACTS / "ui-runs.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "ui-chat.png").stat().st_size > 10_000
