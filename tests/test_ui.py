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
from support.trained import adapter_runs

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


@pytest.fixture
def started_by_cli(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Run a `tunelab ui ...` command line and return the app it would serve, instead of blocking in uvicorn."""
    from typer.testing import CliRunner

    from tunelab.cli import app as cli_app
    from tunelab.serve import server

    started: dict = {}
    monkeypatch.setattr(server, "serve", lambda application, host, port, log_level="info": started.update(
        app=application, host=host, port=port))

    def start(*args: str):  # noqa: ANN202
        result = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"}).invoke(cli_app, ["ui", *map(str, args)])
        assert result.exit_code == 0, result.output
        return started["app"], result.output

    return start


def test_tunelab_ui_without_runs_browses_and_says_how_to_chat(started_by_cli, runs: dict[str, Path]) -> None:  # noqa: ANN001
    app, output = started_by_cli("--runs-root", runs["cats"].parent, "--port", "8123")
    assert "web UI at http://127.0.0.1:8123/" in output and "no model loaded" in output
    with BackgroundServer(app) as server:
        assert "<title>tunelab</title>" in httpx.get(f"{server.url}/").text  # the page tunelab serve serves
        listed = httpx.get(f"{server.url}/ui/api/runs").json()["runs"]
        assert {r["name"]: r["served"] for r in listed} == {"cats": False, "dogs": False, "owls": False}
        assert httpx.get(f"{server.url}/ui/api/runs/owls").json()["curves"]["train"]
        assert httpx.get(f"{server.url}/v1/models").json()["data"] == []
        chat = httpx.post(f"{server.url}/v1/chat/completions", json={
            "model": "base", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 404 and "tunelab ui RUN" in chat.json()["error"]["message"]
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "models": [], "in_flight": 0, "dtype": None,
                                                            "dtype_reason": None}  # no model: no dtype
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:  # the checks above ran; the page's own message needs a browser: say so, never pass
            pytest.skip("Debian's chromium is not installed (make test and make mutants install it when they run as "
                        "root): the page's 'how to chat' message was not checked")
        # the page itself turns to the runs and says how to chat (no model to pick)
        playwright = pytest.importorskip("playwright.sync_api")
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page()
                page.goto(server.url + "/")
                page.wait_for_selector("#runs-table tr[data-run=owls]")  # it opens on the runs
                page.click("nav button[data-tab=chat]")
                assert page.is_visible("#no-models") and "tunelab ui RUN" in page.inner_text("#no-models")
                assert page.is_disabled("#send")
            finally:
                browser.close()


def test_tunelab_ui_with_runs_serves_them_as_tunelab_serve_does(started_by_cli, runs: dict[str, Path]) -> None:  # noqa: ANN001
    app, output = started_by_cli(runs["cats"], runs["dogs"])
    assert "serving base, cats, dogs" in output
    assert app.state.settings.runs_root == runs["cats"].resolve().parent  # browse the runs beside the first
    with BackgroundServer(app) as server:
        reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=30, json={
            "model": "dogs", "messages": [{"role": "user", "content": "say something 3"}], "max_tokens": 8})
        assert reply.status_code == 200 and "dog" in reply.json()["choices"][0]["message"]["content"]


def test_tunelab_ui_refuses_a_missing_runs_folder(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tunelab.cli import app as cli_app

    result = CliRunner(env={"COLUMNS": "250"}).invoke(cli_app, ["ui", "--runs-root", str(tmp_path / "nowhere")])
    assert result.exit_code != 0 and "not a folder" in result.output


@pytest.fixture(scope="module")
def compare_root(tmp_path_factory: pytest.TempPathFactory, runs: dict[str, Path]) -> Path:
    """A runs folder holding one run and a comparison (a `tunelab compare --out` folder): two of the adapter runs
    copied in as its runs, with the compare.json and reports tunelab compare writes from them."""
    import yaml

    from tunelab.compare.report import write_reports
    from tunelab.compare.runner import WRITER, PlannedRun, summarize
    from tunelab.fs import claim

    root = tmp_path_factory.mktemp("ui-compare")
    shutil.copytree(runs["owls"], root / "owls")
    out = root / "cmp"
    claim(out, WRITER)
    planned = [PlannedRun("lora-seed42", "lora", 2e-4, 42), PlannedRun("lora-seed43", "lora", 2e-4, 43)]
    for run, source in zip(planned, ("cats", "dogs")):
        shutil.copytree(runs[source], out / run.name)
    configs = {run.name: yaml.safe_load((out / run.name / "config.yaml").read_text()) for run in planned}
    write_reports(out, summarize(planned, configs, out))
    return root


def test_a_comparison_is_one_group_whose_runs_open_by_their_nested_names(compare_root: Path) -> None:
    """The runs page lists a compare folder's runs as one group, named <compare>/<run>: each opens (its curves,
    its evaluation report), the comparison's own report is served, and a nested name is still never a path."""
    from tunelab.serve.app import create_app
    from tunelab.serve.engine import NoModels

    with BackgroundServer(create_app(NoModels(), ServeSettings(runs_root=compare_root))) as server:
        data = httpx.get(f"{server.url}/ui/api/runs").json()
        assert {r["name"]: r["group"] for r in data["runs"]} == {
            "owls": None, "cmp/lora-seed42": "cmp", "cmp/lora-seed43": "cmp"}
        [group] = data["groups"]
        assert group["name"] == "cmp" and group["status"] == "completed" and group["report"]
        assert group["runs"] == ["lora-seed42", "lora-seed43"] and [t["technique"] for t in group["techniques"]] == ["lora"]
        assert group["techniques"][0]["peak_memory_bytes"] > 0 and "path" not in group
        # the page's own encoding of a nested name (encodeURIComponent: the slash as %2F)
        detail = httpx.get(f"{server.url}/ui/api/runs/cmp%2Flora-seed43").json()
        expected = [[m["step"], m["loss"]] for m in read_metrics(compare_root / "cmp" / "lora-seed43") if m["kind"] == "train"]
        assert detail["name"] == "cmp/lora-seed43" and detail["curves"]["train"] == expected and expected
        assert httpx.get(f"{server.url}/ui/api/runs/cmp/lora-seed42").json()["name"] == "cmp/lora-seed42"
        report = httpx.get(f"{server.url}/ui/compares/cmp/report.html")
        assert report.status_code == 200 and "lora" in report.text
        for name in ("cmp", "cmp%2F..%2Fowls", "cmp/configs", "owls%2F..", "cmp/lora-seed42/..%2F..%2Fowls"):
            response = httpx.get(f"{server.url}/ui/api/runs/{name}")
            assert response.status_code == 404 and "error" in response.json(), name
        assert httpx.get(f"{server.url}/ui/compares/owls/report.html").status_code == 404  # a run, not a comparison
        (compare_root / "cmp" / "compare.json").rename(compare_root / "cmp" / "compare.json.aside")
        try:  # an unfinished comparison (its plan only) is a group already
            (compare_root / "cmp" / "compare_plan.json").write_text("{}")
            [group] = httpx.get(f"{server.url}/ui/api/runs").json()["groups"]
            assert group["status"] == "in progress" and group["techniques"] == [] and len(group["runs"]) == 2
        finally:
            (compare_root / "cmp" / "compare.json.aside").rename(compare_root / "cmp" / "compare.json")


def test_the_runs_page_shows_a_comparison_as_one_group_in_headless_chromium(compare_root: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make test installs it when it runs as root); "
                    "the browser check needs it")
    playwright = pytest.importorskip("playwright.sync_api")
    from tunelab.serve.app import create_app
    from tunelab.serve.engine import NoModels

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with BackgroundServer(create_app(NoModels(), ServeSettings(runs_root=compare_root))) as server, \
            playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(server.url + "/")
            page.wait_for_selector("#runs-table tr.group[data-group=cmp]")  # a page-only server opens on the runs
            rows = page.eval_on_selector_all("#runs-table tbody tr", "trs => trs.map(t => t.dataset.run || 'group:' + t.dataset.group)")
            assert rows == ["owls", "group:cmp", "cmp/lora-seed42", "cmp/lora-seed43"]
            assert "Pareto" in page.inner_text("#runs-table tr.group") and page.is_visible("a[data-compare-report]")
            page.click("#runs-table tr[data-run='cmp/lora-seed43']")
            page.wait_for_selector("#run-detail svg.chart")
            assert page.inner_text("#run-detail h2") == "cmp/lora-seed43"
            page.screenshot(path=str(ARTIFACTS / "ui-runs-compare.png"), full_page=True)
        finally:
            browser.close()


def test_a_served_run_of_a_comparison_is_marked_served(compare_root: Path) -> None:
    """The runs page marks the comparison's run the server answers with, by its folder (the server names it by
    its folder's name, which a run elsewhere may share)."""
    served = compare_root / "cmp" / "lora-seed42"
    namesake = compare_root / "lora-seed42"  # a run of the root with the served run's folder name
    shutil.copytree(compare_root / "owls", namesake)
    try:
        with BackgroundServer(build_app([served], ServeSettings(runs_root=compare_root), device="cpu")) as server:
            listed = httpx.get(f"{server.url}/ui/api/runs").json()["runs"]
    finally:
        shutil.rmtree(namesake)
    assert {r["name"]: r["served"] for r in listed} == {
        "lora-seed42": False, "owls": False, "cmp/lora-seed42": True, "cmp/lora-seed43": False}
