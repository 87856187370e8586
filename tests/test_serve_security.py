"""The server's door: an API key (constant-time, 401 in OpenAI's error shape, /health and the page open), a
request body limit (413 before anything is parsed, declared or chunked), the warning for a keyless server on
the network, and the `serve` / `ui` options that set them. Checked with the official `openai` client and with
curl against live uvicorn on 127.0.0.1; nothing here talks to another address."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import openai
import psutil
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings, strategies as st
from schemathesis import GenerationMode
from support.greedy import offline_greedy
from support.trained import adapter_runs

from tunelab.generation import render_chat
from tunelab.result import load_run
from tunelab.serve import app as app_module
from tunelab.serve.app import ServeSettings
from tunelab.serve.server import BackgroundServer, build_app, exposure_warning

KEY = "sk-tunelab-test-7d41"
LIMIT = 4096  # bytes; the keyed server's --max-body-bytes
USER = [{"role": "user", "content": "say something 5"}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    return adapter_runs(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def keyed(runs: dict[str, Path]):  # noqa: ANN201 - a running BackgroundServer that needs KEY
    settings = ServeSettings(api_key=KEY, max_body_bytes=LIMIT, max_tokens_limit=64, default_max_tokens=8,
                             runs_root=runs["cats"].parent)
    with BackgroundServer(build_app([runs["cats"], runs["dogs"]], settings, device="cpu")) as running:
        yield running


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


# ---------------------------------------------------------------- the API key


def test_openai_client_with_the_right_key_gets_offline_greedy(keyed: BackgroundServer, runs: dict[str, Path]) -> None:
    loaded = load_run(runs["cats"], device="cpu")
    expected = offline_greedy(loaded.model, loaded.tokenizer, render_chat(loaded.tokenizer, USER), 8)
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(model="cats", messages=USER, max_tokens=8)
    assert reply.choices[0].message.content == expected
    streamed = client.chat.completions.create(model="cats", messages=USER, max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
    assert {m.id for m in client.models.list()} == {"base", "cats", "dogs"}


@pytest.mark.parametrize("key", ["sk-wrong", KEY + "x", KEY[:-1], KEY.upper()])
def test_openai_client_with_a_wrong_key_raises_authentication_error(keyed: BackgroundServer, key: str) -> None:
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=key, max_retries=0)
    calls = [lambda: client.chat.completions.create(model="cats", messages=USER, max_tokens=4),
             lambda: client.completions.create(model="cats", prompt="the", max_tokens=4),
             lambda: client.models.list(), lambda: client.models.retrieve("cats")]
    for call in calls:
        with pytest.raises(openai.AuthenticationError) as raised:
            call()
        assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
        assert raised.value.type == "invalid_request_error" and KEY not in str(raised.value.body)


def curl(url: str, *args: str) -> tuple[int, str, str]:
    """(status, body, headers) of one curl call; --noproxy so a proxy in the environment never sees it."""
    done = subprocess.run(["curl", "-sS", "--noproxy", "*", "--max-time", "60", "-D", "-", "-w", "\n%{http_code}",
                           *args, url], capture_output=True, timeout=90, check=True)
    text, status = done.stdout.decode().rsplit("\n", 1)
    headers, _, body = text.partition("\r\n\r\n")
    return int(status), body, headers.lower()


def test_curl_needs_the_key_on_v1_and_nothing_else_on_health_and_the_page(keyed: BackgroundServer) -> None:
    chat = ["-H", "Content-Type: application/json", "-d", json.dumps({"model": "dogs", "messages": USER, "max_tokens": 6})]
    status, body, headers = curl(f"{keyed.url}/v1/chat/completions", *chat)
    assert status == 401 and "www-authenticate: bearer" in headers
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]
    status, body, _ = curl(f"{keyed.url}/v1/chat/completions", "-H", "Authorization: Bearer nope", *chat)
    assert status == 401 and json.loads(body)["error"]["message"] == "Incorrect API key provided"
    status, body, _ = curl(f"{keyed.url}/v1/chat/completions", "-H", f"Authorization: Bearer {KEY}", *chat)
    assert status == 200 and "dog" in json.loads(body)["choices"][0]["message"]["content"]
    status, body, _ = curl(f"{keyed.url}/v1/chat/completions", "-H", f"authorization: bearer {KEY}", *chat)
    assert status == 200  # the scheme is case-insensitive (RFC 7235)
    for path in ("/v1/models", "/v1/models/cats", "/metrics", "/ui/api/runs", "/ui/api/runs/cats", "/openapi.json",
                 "/v1/nowhere"):
        assert curl(f"{keyed.url}{path}")[0] == 401, path
        assert curl(f"{keyed.url}{path}", "-H", f"Authorization: Basic {KEY}")[0] == 401, path
    status, body, _ = curl(f"{keyed.url}/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body, _ = curl(f"{keyed.url}/")
    assert status == 200 and "<title>tunelab</title>" in body
    metrics = httpx.get(f"{keyed.url}/metrics", headers=auth()).text
    assert 'tunelab_rejected_requests_total{reason="auth"}' in metrics


def test_two_authorization_headers_are_refused(keyed: BackgroundServer) -> None:
    status, _, _ = curl(f"{keyed.url}/v1/models", "-H", f"Authorization: Bearer {KEY}", "-H", "Authorization: Bearer x")
    assert status == 401


def test_the_key_is_compared_in_constant_time(keyed: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = app_module.hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", recording)
    assert httpx.get(f"{keyed.url}/v1/models", headers=auth()).status_code == 200
    assert httpx.get(f"{keyed.url}/v1/models", headers=auth("sk-wrong")).status_code == 401
    assert len(compared) == 2 and all(len(a) == len(b) for a, b in compared)  # digests: equal lengths


def test_a_server_without_a_key_stays_open(runs: dict[str, Path]) -> None:
    # The default (a loopback-only server) asks for nothing: the existing clients and the page keep working.
    with BackgroundServer(build_app([runs["owls"]], ServeSettings(max_tokens_limit=8), device="cpu")) as running:
        assert httpx.get(f"{running.url}/v1/models").status_code == 200
        assert httpx.get(f"{running.url}/v1/models", headers=auth("anything")).status_code == 200


def test_an_empty_key_is_refused() -> None:
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match="empty"):
        ServeSettings(api_key="  ")


def test_the_page_sends_the_key_from_the_address_or_asks_for_it(keyed: BackgroundServer) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make test installs it when it runs as root); "
                    "the browser check needs it")
    playwright = pytest.importorskip("playwright.sync_api")
    question = "say something 3"
    expected = httpx.post(f"{keyed.url}/v1/chat/completions", headers=auth(), timeout=30, json={
        "model": "dogs", "messages": [{"role": "user", "content": question}], "max_tokens": 8}).json()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()  # the key in the fragment: never sent, moved out of the address bar
            page.goto(f"{keyed.url}/#key={KEY}")
            page.wait_for_function("document.querySelectorAll('#model option').length === 3")
            assert "key" not in page.url
            page.select_option("#model", "dogs")
            page.uncheck("#side-by-side")
            page.fill("#max-tokens", "8")
            page.fill("#message", question)
            page.click("#send")
            page.wait_for_selector("#chat-main .msg.assistant[data-done=true]", timeout=90000)
            assert page.inner_text("#chat-main .msg.assistant") == expected["choices"][0]["message"]["content"].strip()
            asked: list[str] = []
            other = browser.new_context().new_page()  # a fresh tab without the key: the page asks for it
            other.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept(KEY)))
            other.goto(f"{keyed.url}/")
            other.wait_for_function("document.querySelectorAll('#model option').length === 3")
            other.click("nav button[data-tab=runs]")
            other.wait_for_selector("#runs-table tr[data-run=owls]")  # the run browser's calls carry it too
            assert len(asked) == 1 and "API key" in asked[0]
        finally:
            browser.close()


# ---------------------------------------------------------------- the body limit


def raw_http(url: str, request: bytes, timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
    """Send ``request`` as is on a fresh connection and read the whole answer (the server closes after a 413)."""
    address = urlparse(url)
    with socket.create_connection((address.hostname, address.port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_declared_oversize_body_gets_413_before_it_is_sent(keyed: BackgroundServer) -> None:
    # The headers promise a gigabyte and no byte of it follows: only a server that answers from Content-Length
    # alone replies (one that reads first would wait for the body until this socket's timeout).
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {10**9}\r\n\r\n").encode()
    status, body = raw_http(keyed.url, head)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert str(10**9) in body["error"]["message"] and str(LIMIT) in body["error"]["message"]


def padded_chat(size: int) -> bytes:
    """A valid chat request of exactly ``size`` bytes (the padding is a field the server ignores)."""
    empty = json.dumps({"model": "cats", "messages": USER, "max_tokens": 4, "user": ""}).encode()
    return json.dumps({"model": "cats", "messages": USER, "max_tokens": 4, "user": "x" * (size - len(empty))}).encode()


def test_a_chunked_oversize_body_gets_413(keyed: BackgroundServer) -> None:
    body = padded_chat(LIMIT + 1)  # valid: a server that parsed it would answer 200 (see the next test)
    chunks = [body[i:i + 500] for i in range(0, len(body), 500)]  # no Content-Length: Transfer-Encoding chunked
    response = httpx.post(f"{keyed.url}/v1/chat/completions", content=iter(chunks), timeout=30,
                          headers={**auth(), "Content-Type": "application/json"})
    assert "content-length" not in response.request.headers and response.request.headers["transfer-encoding"] == "chunked"
    error = assert_openai_error(response, 413, "request_too_large")
    assert str(LIMIT) in error["message"]


def test_a_body_at_the_limit_is_answered_declared_or_chunked(keyed: BackgroundServer) -> None:
    body = padded_chat(LIMIT)
    headers = {**auth(), "Content-Type": "application/json"}
    declared = httpx.post(f"{keyed.url}/v1/chat/completions", content=body, headers=headers, timeout=30)
    chunked = httpx.post(f"{keyed.url}/v1/chat/completions", content=iter([body[:1000], body[1000:]]), headers=headers,
                         timeout=30)
    assert declared.status_code == chunked.status_code == 200, (declared.text, chunked.text)
    assert declared.json()["choices"][0]["message"]["content"] == chunked.json()["choices"][0]["message"]["content"]


def test_curl_gets_413_for_a_large_body(keyed: BackgroundServer, tmp_path: Path) -> None:
    (tmp_path / "big.json").write_bytes(padded_chat(LIMIT + 100))
    status, body, _ = curl(f"{keyed.url}/v1/chat/completions", "-H", f"Authorization: Bearer {KEY}",
                           "-H", "Content-Type: application/json", "--data-binary", f"@{tmp_path / 'big.json'}")
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    metrics = httpx.get(f"{keyed.url}/metrics", headers=auth()).text
    assert 'tunelab_rejected_requests_total{reason="body_size"}' in metrics


def test_without_the_key_even_a_large_body_is_not_read(keyed: BackgroundServer) -> None:
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {10**9}\r\nConnection: close\r\n\r\n").encode()
    status, body = raw_http(keyed.url, head)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


# ---------------------------------------------------------------- fuzzing the OpenAPI schema

FUZZ_REQUESTS = 200
FUZZ_SECONDS = 150  # the bound on this 2-core machine; the run itself takes well under it
SEEN: list[tuple[str, str, int]] = []  # (method, path, status) of each fuzzed request


def fuzz_cases(app: Any) -> st.SearchStrategy:
    """schemathesis cases over every operation of the app's own OpenAPI schema, bodies that fit it (positive)
    and bodies that do not (negative), with `model` drawn from the served names so valid ones really generate."""
    document = app.openapi()
    served = sorted(app.state.engine.served)
    for component in document["components"]["schemas"].values():
        if "model" in component.get("properties", {}):
            component["properties"]["model"] = {"type": "string", "enum": served}
    operations = [result.ok() for result in schemathesis.openapi.from_dict(document).get_all_operations()]
    return st.one_of([operation.as_strategy(generation_mode=mode) for operation in operations for mode in GenerationMode])


def schema_keywords(node: Any) -> set[str]:
    """Every key used as a keyword in a JSON Schema tree (the names under 'properties' are field names, not keywords)."""
    if isinstance(node, list):
        return set().union(*(schema_keywords(item) for item in node))
    if not isinstance(node, dict):
        return set()
    found = set(node) - {"properties"}
    for key, value in node.items():
        children = value.values() if key in ("properties", "schemas", "paths", "content", "responses") else [value]
        found |= set().union(*(schema_keywords(child) for child in children))
    return found


def test_the_openapi_schema_states_its_bounds_as_json_schema(keyed: BackgroundServer) -> None:
    # What the fuzzer draws from and what clients read: a bound written as pydantic's 'ge'/'le' is invisible to both.
    document = keyed.app.openapi()
    assert not schema_keywords(document["components"]) & {"ge", "gt", "le", "lt"}
    temperature = document["components"]["schemas"]["ChatCompletionRequest"]["properties"]["temperature"]["anyOf"]
    assert {(b.get("minimum"), b.get("maximum")) for b in temperature if b.get("type") != "null"} == {(0, 2)}


@pytest.mark.parametrize("field,value,status", [("temperature", 5e-324, 400), ("temperature", 1e-300, 400),
                                                ("repetition_penalty", 5e-324, 400), ("temperature", 1e-5, 200),
                                                ("repetition_penalty", 1e-5, 200), ("temperature", 0, 200)])
def test_a_vanishing_temperature_or_penalty_is_a_400_not_a_500(keyed: BackgroundServer, field: str, value: float,
                                                              status: int) -> None:
    # Found by the fuzzer: 5e-324 is a valid JSON number above 0, and dividing the logits by it made them inf (500).
    body = {"model": "base", "prompt": "the", "max_tokens": 2, field: value}
    response = httpx.post(f"{keyed.url}/v1/completions", headers=auth(), json=body, timeout=60)
    assert response.status_code == status, response.text
    if status == 400:
        assert assert_openai_error(response, 400)["param"] == field


KEYS = st.sampled_from([f"Bearer {KEY}"] * 6 + [None, "Bearer wrong", f"Basic {KEY}", "Bearer", f"Bearer  {KEY} "])


def test_fuzzed_requests_over_the_openapi_schema_never_get_a_500(keyed: BackgroundServer) -> None:
    session = requests.Session()
    session.trust_env = False  # no proxy from the environment: 127.0.0.1 only

    # derandomize: the same 200 requests on every run, so a failure reproduces and the mutation check is stable
    @settings(max_examples=FUZZ_REQUESTS, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=fuzz_cases(keyed.app), authorization=KEYS)
    def one_request(case: Any, authorization: str | None) -> None:
        headers = {"Authorization": authorization} if authorization else {}
        response = case.call(base_url=keyed.url, session=session, headers=headers, timeout=60)
        SEEN.append((case.method, case.path, response.status_code))
        assert response.status_code < 500, json.dumps([case.method, case.formatted_path, case.body, response.text])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text

    started = time.monotonic()
    one_request()
    elapsed = time.monotonic() - started
    statuses = sorted({status for _, _, status in SEEN})
    generated = sum(method == "POST" and status == 200 for method, _, status in SEEN)
    print(f"fuzzed {len(SEEN)} requests in {elapsed:.1f} s ({generated} generated an answer); statuses {statuses}; "
          f"operations {sorted({(m, p) for m, p, _ in SEEN})}")
    assert len(SEEN) >= FUZZ_REQUESTS and elapsed < FUZZ_SECONDS
    assert generated >= 10 and 401 in statuses and any(400 <= s < 500 and s != 401 for s in statuses)  # all kinds met
    assert httpx.get(f"{keyed.url}/health").json()["status"] == "ok"


# ---------------------------------------------------------------- load: many clients, a third of them leaving

CLIENTS = 64
LOAD_TOKENS = 16  # per request: enough that a client leaving after its first token leaves mid-generation
LOAD_SECONDS = 120  # the bound: the load took 18-67 s on the shared 2-core development machine


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def served_process(runs: dict[str, Path], tmp_path: Path):  # noqa: ANN201 - (url, psutil.Process)
    """`tunelab serve` in its own process on 127.0.0.1, so its memory is its own to measure."""
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    command = [sys.executable, "-m", "tunelab", "serve", str(runs["cats"]), str(runs["dogs"]), "--host", "127.0.0.1",
               "--port", str(port), "--api-key", KEY, "--max-tokens-limit", "64", "--max-concurrent", str(CLIENTS)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, psutil.Process(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def settled_rss(process: psutil.Process, seconds: float = 2.0) -> int:
    """The server's resident memory once it has been idle a moment (the lowest of a few readings)."""
    readings = []
    for _ in range(5):
        time.sleep(seconds / 5)
        readings.append(process.memory_info().rss)
    return min(readings)


async def one_client(client: httpx.AsyncClient, index: int) -> str:
    """Client ``index``: every third one leaves after its first token; the others read to the end, half streaming."""
    body = {"model": ("cats", "dogs", "base")[index % 3], "max_tokens": LOAD_TOKENS,
            "messages": [{"role": "user", "content": f"say something {index}" + " again" * (index % 5)}]}
    if index % 3 == 2:
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return "complete"
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and '"content":' in line and '"content": ""' not in line:
                if index % 3 == 0:
                    return "left"  # closing the stream here drops the connection mid-generation
            if line == "data: [DONE]":
                return "streamed"
    raise AssertionError(f"client {index}: the stream ended without [DONE]")


async def load(url: str) -> list[str]:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, headers=auth(), limits=limits, timeout=120, trust_env=False) as client:
        return await asyncio.gather(*(one_client(client, i) for i in range(CLIENTS)))


def cancelled_by_disconnect(url: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=auth(), trust_env=False).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('tunelab_cancelled_generations_total{reason="disconnect"}'))


def test_64_clients_a_third_leaving_mid_stream_leave_the_server_healthy(served_process, runs: dict[str, Path]) -> None:  # noqa: ANN001
    url, process = served_process
    started = time.monotonic()
    question = [{"role": "user", "content": "say something 7"}]
    ask = lambda: httpx.post(f"{url}/v1/chat/completions", headers=auth(), timeout=60, trust_env=False,  # noqa: E731
                             json={"model": "cats", "messages": question, "max_tokens": 16})
    warm = ask()  # warm-up: the first request allocates what every later one reuses
    assert warm.status_code == 200
    rss_before = settled_rss(process)
    load_started = time.monotonic()
    outcomes = asyncio.run(load(url))
    load_seconds = time.monotonic() - load_started
    leavers = len(range(0, CLIENTS, 3))
    assert outcomes.count("left") == leavers and outcomes.count("complete") + outcomes.count("streamed") == CLIENTS - leavers
    deadline = time.monotonic() + 30
    while (health := httpx.get(f"{url}/health", trust_env=False)).json()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health.status_code == 200
    assert {key: health.json()[key] for key in ("status", "models", "in_flight", "dtype")} == {
        "status": "ok", "models": ["base", "cats", "dogs"], "in_flight": 0, "dtype": "float32"}
    rss_after = settled_rss(process)  # the server's own collector has had the idle seconds to run
    change = (rss_after - rss_before) / rss_before
    print(f"{CLIENTS} clients in {load_seconds:.1f} s; {cancelled_by_disconnect(url):.0f} generations cancelled by a "
          f"disconnect; RSS {rss_before / 2**20:.1f} MiB before, {rss_after / 2**20:.1f} MiB after ({change:+.1%})")
    assert abs(change) <= 0.10
    assert cancelled_by_disconnect(url) >= 1  # some leavers really left mid-generation
    loaded = load_run(runs["cats"], device="cpu")
    expected = offline_greedy(loaded.model, loaded.tokenizer, render_chat(loaded.tokenizer, question), 16)
    after = ask()
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == expected == \
        warm.json()["choices"][0]["message"]["content"]
    assert time.monotonic() - started < LOAD_SECONDS


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("host,warned", [("127.0.0.1", False), ("127.0.0.2", False), ("localhost", False),
                                         ("::1", False), ("0.0.0.0", True), ("::", True), ("192.168.1.20", True),
                                         ("myhost.example", True)])
def test_a_keyless_server_off_loopback_is_warned_about(host: str, warned: bool) -> None:
    warning = exposure_warning(host, None)
    assert (warning is not None) == warned
    if warned:
        assert host in warning and "without an API key" in warning and "anyone who can reach" in warning
    assert exposure_warning(host, KEY) is None


@pytest.fixture
def started_by_cli(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Run a `tunelab serve|ui ...` command line; return the app it would serve and what it printed."""
    from typer.testing import CliRunner

    from tunelab.cli import app as cli_app
    from tunelab.serve import server

    started: dict = {}
    monkeypatch.setattr(server, "serve", lambda application, host, port, log_level="info": started.update(app=application))

    def start(*args: Any, env: dict[str, str | None] | None = None) -> tuple[Any, str]:
        runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1", "TUNELAB_API_KEY": None, **(env or {})})
        result = runner.invoke(cli_app, list(map(str, args)))
        assert result.exit_code == 0, result.output
        return started.pop("app"), result.output

    return start


def test_ui_on_all_interfaces_without_a_key_warns(started_by_cli, runs: dict[str, Path]) -> None:  # noqa: ANN001
    app, output = started_by_cli("ui", "--runs-root", runs["cats"].parent, "--host", "0.0.0.0")
    assert "warning: listening on 0.0.0.0 without an API key" in " ".join(output.split())
    assert app.state.settings.api_key is None
    _, output = started_by_cli("ui", "--runs-root", runs["cats"].parent)  # 127.0.0.1: no warning
    assert "warning" not in output


def test_ui_takes_the_key_from_the_environment(started_by_cli, runs: dict[str, Path]) -> None:  # noqa: ANN001
    app, output = started_by_cli("ui", "--runs-root", runs["cats"].parent, "--host", "0.0.0.0",
                                 "--max-body-bytes", "1234", env={"TUNELAB_API_KEY": KEY})
    assert "warning" not in output and KEY not in output and "#key=<key>" in output
    assert app.state.settings.api_key == KEY and app.state.settings.max_body_bytes == 1234
    with BackgroundServer(app) as running:
        assert httpx.get(f"{running.url}/ui/api/runs").status_code == 401
        assert httpx.get(f"{running.url}/ui/api/runs", headers=auth()).json()["runs"]
        assert httpx.get(f"{running.url}/").status_code == 200


def test_serve_takes_the_key_option_and_warns_without_it(started_by_cli, runs: dict[str, Path]) -> None:  # noqa: ANN001
    app, output = started_by_cli("serve", runs["owls"], "--host", "0.0.0.0", "--api-key", KEY, "--max-body-bytes", "2000")
    assert "warning" not in output and app.state.settings.api_key == KEY and app.state.settings.max_body_bytes == 2000
    with BackgroundServer(app) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key=KEY, max_retries=0)
        assert client.completions.create(model="owls", prompt="the", max_tokens=3).choices[0].text is not None
        assert httpx.post(f"{running.url}/v1/completions", content=b"x" * 2001, headers=auth()).status_code == 413
    app, output = started_by_cli("serve", runs["owls"], "--host", "0.0.0.0")
    assert "warning: listening on 0.0.0.0 without an API key" in " ".join(output.split())
    app.state.engine.close()


def test_serve_scheduling_option_sets_the_engine(started_by_cli, runs: dict[str, Path]) -> None:  # noqa: ANN001
    """benchmarks/serve.py starts `tunelab serve` as a user does, with its comparison points behind the hidden
    --scheduling option; continuous batching with mixed adapters is the default."""
    from typer.testing import CliRunner

    from tunelab.cli import app as cli_app

    expected = {None: (True, True), "whole-batch": (False, True), "per-adapter": (True, False)}
    for scheduling, (continuous, mixed) in expected.items():
        app, _ = started_by_cli("serve", runs["cats"], runs["dogs"], *(["--scheduling", scheduling] if scheduling else []))
        engine = app.state.engine
        assert (engine.continuous, engine.mix_adapters) == (continuous, mixed)
        engine.close()
    result = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"}).invoke(cli_app, ["serve", str(runs["cats"]), "--scheduling", "fifo"])
    assert result.exit_code == 2 and "--scheduling fifo: expected one of continuous, whole-batch, per-adapter" in result.output
