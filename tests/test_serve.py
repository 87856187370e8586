"""The OpenAI-compatible server: the official client gets what offline greedy generation gives, for each adapter
and the base, streamed or not; mixed concurrent batches equal single requests; bad input is a 4xx in OpenAI's
error shape, never a 500; adapters load only from the given run folders; limits, deadlines and disconnects."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from support.greedy import offline_greedy
from support.trained import adapter_runs
from transformers import AutoModelForCausalLM

from tunelab.errors import ConfigError
from tunelab.generation import render_chat
from tunelab.result import load_run
from tunelab.serve.app import ServeSettings, create_app
from tunelab.serve.engine import Engine, load_models
from tunelab.serve.server import BackgroundServer, build_app

LIMITS = ServeSettings(max_concurrent=48, max_tokens_limit=64, default_max_tokens=8, request_timeout_s=60)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    return adapter_runs(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def server(runs: dict[str, Path]):  # noqa: ANN201 - a running BackgroundServer
    app = build_app(list(runs.values()), LIMITS, device="cpu")
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(runs: dict[str, Path], tiny_model_dir: Path) -> dict[str, tuple[Any, Any]]:
    """name -> (model, tokenizer) opened the ordinary way: load_run for each adapter, transformers for the base."""
    models = {name: (lambda r: (r.model, r.tokenizer))(load_run(path, device="cpu")) for name, path in runs.items()}
    models["base"] = (AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), models["cats"][1])
    return models


def chat_reference(offline: dict, name: str, question: str, max_tokens: int) -> str:
    model, tokenizer = offline[name]
    return offline_greedy(model, tokenizer, render_chat(tokenizer, [{"role": "user", "content": question}]), max_tokens)


# ---------------------------------------------------------------- the official client


@pytest.mark.parametrize("name", ["cats", "dogs", "base"])
def test_openai_client_chat_equals_offline_greedy(client: openai.OpenAI, offline: dict, name: str) -> None:
    question = "say something 11"
    expected = chat_reference(offline, name, question, 10)
    reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                           max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == expected and reply.model == name
    assert reply.usage.completion_tokens > 0
    stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                            max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_sampling_options_mean_the_same_in_serve_and_generate(client: openai.OpenAI, offline: dict,
                                                              runs: dict[str, Path]) -> None:
    """top-k, repetition penalty and stop strings: the server and `tunelab generate` give what transformers gives."""
    from typer.testing import CliRunner

    from tunelab.cli import app

    model, tokenizer = offline["cats"]
    question = "say something 3"
    ids = torch.tensor([tokenizer(render_chat(tokenizer, [{"role": "user", "content": question}]),
                                  add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             repetition_penalty=8.0, eos_token_id=[tokenizer.eos_token_id],
                             pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert expected != chat_reference(offline, "cats", question, 10)  # control: the penalty changes the answer
    stop = expected.strip()[2:4]
    served = [client.chat.completions.create(model="cats", messages=[{"role": "user", "content": question}],
                                             max_tokens=10, temperature=1.0, stop=stops,
                                             extra_body={"top_k": 1, "repetition_penalty": 8.0}
                                             ).choices[0].message.content for stops in (None, [stop])]
    options = ["--temperature", "1", "--top-k", "1", "--repetition-penalty", "8", "--max-new-tokens", "10"]
    generated = [CliRunner().invoke(app, ["generate", str(runs["cats"]), "--prompt", question, *options, *more]).output
                 for more in ([], ["--stop", stop])]
    assert served[0] == expected and generated[0].strip() == expected.strip()  # top-1 sampling is greedy
    assert served[1] == expected[:expected.find(stop)] and generated[1].strip() == served[1].strip()


def _generate_and_serve(runs: dict[str, Path], server: BackgroundServer, temperature: str) -> tuple[Any, httpx.Response]:
    """`tunelab generate --temperature T` and the same temperature in a chat request to the server."""
    from typer.testing import CliRunner

    from tunelab.cli import app

    cli = CliRunner().invoke(app, ["generate", str(runs["cats"]), "--prompt", "say something 3", "--temperature",
                                   temperature, "--max-new-tokens", "4", "--seed", "0"])
    served = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": "cats", "messages": [{"role": "user", "content": "say something 3"}], "max_tokens": 4,
        "temperature": float(temperature), "seed": 0})
    return cli, served


@pytest.mark.parametrize("temperature", ["5e-324", "1e-300"])
def test_a_vanishing_temperature_is_refused_alike_by_generate_and_the_server(
    runs: dict[str, Path], server: BackgroundServer, temperature: str,
) -> None:
    """Dividing the logits by 5e-324 makes them inf and their softmax nan: sampling failed mid-generation with a
    traceback (`probability tensor contains either inf, nan or element < 0`). Both refuse it up front, in one line
    and with one message, from generation.py's rule."""
    cli, served = _generate_and_serve(runs, server, temperature)
    message = f"temperature {float(temperature):g} is too small"
    assert cli.exit_code == 2 and message in cli.output and "Traceback" not in cli.output, cli.output
    assert message in assert_openai_error(served, 400)["message"]
    cli, served = _generate_and_serve(runs, server, "1e-05")  # the smallest temperature taken: it samples
    assert cli.exit_code == 0 and cli.output.strip(), cli.output
    assert served.status_code == 200, served.text


def test_generate_and_the_server_share_generations_rule(runs: dict[str, Path], server: BackgroundServer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from tunelab import generation

    monkeypatch.setattr(generation, "SMALLEST_DIVISOR", 0.5)  # the rule moved: both follow it
    cli, served = _generate_and_serve(runs, server, "0.3")
    assert cli.exit_code == 2 and "temperature 0.3 is too small" in cli.output, cli.output
    assert "temperature 0.3 is too small" in assert_openai_error(served, 400)["message"]


def test_adapters_really_differ(client: openai.OpenAI) -> None:
    # Negative control for the equalities above: each adapter answers its own word, so a mix-up would show.
    answers = {name: client.chat.completions.create(model=name, messages=[{"role": "user", "content": "say something 2"}],
                                                    max_tokens=6).choices[0].message.content for name in ("cats", "dogs", "owls")}
    assert "cat" in answers["cats"] and "dog" in answers["dogs"] and "owl" in answers["owls"]


def test_completions_and_models(client: openai.OpenAI, offline: dict) -> None:
    model, tokenizer = offline["owls"]
    prompts = ["the quick brown", "python is a"]
    result = client.completions.create(model="owls", prompt=prompts, max_tokens=6)
    assert [c.text for c in result.choices] == [offline_greedy(model, tokenizer, p, 6, special=True) for p in prompts]
    assert {m.id for m in client.models.list()} == {"base", "cats", "dogs", "owls"}


def test_in_bfloat16_concurrent_served_answers_equal_tunelab_generate(runs: dict[str, Path],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU with native bfloat16, `tunelab serve --dtype bfloat16` loads bfloat16 weights, says so in /health and
    /metrics, and 12 concurrent requests mixing three adapters (stacked rows, cached prefixes) get exactly what
    `tunelab generate` gives each prompt alone, which loads the run by the same rule. The CPU is declared native
    here (TUNELAB_CPU_BF16=1's effect): on a host without it bfloat16 is emulated, slow, so the model is tiny."""
    from tunelab import invariance, precision, use
    from tunelab.generation import Sampling

    monkeypatch.setattr(precision, "detect_cpu_bf16", lambda: precision.CpuBf16(True, "test: native bfloat16"))
    generated_in, generate = set(), use.generate_batch
    monkeypatch.setattr(use, "generate_batch", lambda model, *args: (
        generated_in.add(model.get_input_embeddings().weight.dtype), generate(model, *args))[1])
    names = ["cats", "dogs", "owls"]
    cases = [(names[i % 3], f"say something {i}" + " again" * (i % 2)) for i in range(12)]
    alone = [next(use.generate_from_run(runs[name], [question], None, Sampling(max_new_tokens=8),
                                        dtype="bfloat16"))["output"] for name, question in cases]
    assert generated_in == {torch.bfloat16}  # `tunelab generate --dtype bfloat16` loads the run as the server does
    app = build_app([runs[name] for name in names], dataclasses.replace(LIMITS, dtype="bfloat16"), device="cpu")
    with BackgroundServer(app) as running:
        engine = running.app.state.engine
        base = {p.dtype for n, p in engine.model.named_parameters() if "lora_" not in n}
        adapters = {p.dtype for n, p in engine.model.named_parameters() if "lora_" in n}
        assert base == {torch.bfloat16} and adapters == {torch.float32}  # PEFT keeps adapters float32
        # row-invariant (tunelab.invariance): every product padded, the adapters loaded after the first included
        assert all(invariance.min_rows(m) == invariance.MIN_ROWS for m in engine.model.modules() if type(m) is torch.nn.Linear)
        health = httpx.get(f"{running.url}/health").json()
        assert health["dtype"] == "bfloat16" and "--dtype bfloat16" in health["dtype_reason"]
        assert "computed row by row" in health["dtype_reason"]
        assert 'tunelab_model_info{dtype="bfloat16"' in httpx.get(f"{running.url}/metrics").text
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)

        def ask(case: tuple[str, str]) -> str:
            return client.chat.completions.create(model=case[0], messages=[{"role": "user", "content": case[1]}],
                                                  max_tokens=8, temperature=0).choices[0].message.content.strip()

        passes, rows = engine.batches, engine.batch_rows
        with ThreadPoolExecutor(12) as pool:
            together = list(pool.map(ask, cases))
        assert (engine.batch_rows - rows) / (engine.batches - passes) > 1.5  # they really shared batches
        assert engine.batch.mixed.installs > 0 and engine.batch.mixed.own  # mixed rows went through stacked rows
    assert together == alone and len(set(alone)) == 3  # each adapter its own answer


def test_32_concurrent_mixed_requests_equal_single_requests(client: openai.OpenAI, server: BackgroundServer) -> None:
    names = ["cats", "dogs", "owls", "base"]
    cases = [(names[i % 4], f"say something {i}" + " again" * (i % 3)) for i in range(32)]

    def ask(case: tuple[str, str]) -> str:
        return client.chat.completions.create(model=case[0], messages=[{"role": "user", "content": case[1]}],
                                              max_tokens=8).choices[0].message.content

    alone = [ask(case) for case in cases]
    engine = server.app.state.engine
    batches, rows = engine.batches, engine.batch_rows
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, cases))
    assert together == alone
    assert (engine.batch_rows - rows) / (engine.batches - batches) > 1.5  # they really shared batches


def test_concurrent_requests_of_their_own_lengths_adapters_and_settings_equal_offline_greedy(
        client: openai.OpenAI, offline: dict, server: BackgroundServer) -> None:
    """Continuous batching: requests join the running batch at the next decoding step and leave it when they end,
    each with its own adapter, prompt length, token budget, repetition penalty and streaming; every answer is
    still what plain transformers generation gives that request alone."""
    names = ["cats", "dogs", "owls", "base"]
    cases = [(names[i % 4], f"say something {i}" + " again" * (i % 3), 3 + (i * 5) % 11, 8.0 if i % 3 == 0 else None,
              i % 2 == 0) for i in range(16)]

    def expected(case: tuple) -> str:
        name, question, budget, penalty, _ = case
        model, tokenizer = offline[name]
        prompt = render_chat(tokenizer, [{"role": "user", "content": question}])
        return offline_greedy(model, tokenizer, prompt, budget, repetition_penalty=penalty)

    def ask(case: tuple) -> str:
        name, question, budget, penalty, stream = case
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                               max_tokens=budget, temperature=0, stream=stream,
                                               extra_body={"repetition_penalty": penalty} if penalty else None)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
        return reply.choices[0].message.content

    engine = server.app.state.engine
    passes, rows, reused = engine.batches, engine.batch_rows, engine.batch.prefixes.reused_tokens
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, cases))
    assert together == [expected(case) for case in cases]
    assert len(set(together)) > 8 and (engine.batch_rows - rows) / (engine.batches - passes) > 1.5
    assert engine.batch.prefixes.reused_tokens > reused  # rows prefilled over their adapter's cached prefix


@pytest.mark.parametrize("mix", [True, False])
def test_adapters_share_a_batch_unless_told_not_to(client: openai.OpenAI, server: BackgroundServer, mix: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    batch = server.app.state.engine.batch
    seen: list[set[str]] = []
    real = batch.step

    def recording() -> list:
        finished = real()
        seen.append({r.adapter for r in batch.running + finished})  # the rows of this step's forward passes
        return finished

    monkeypatch.setattr(batch, "step", recording)
    monkeypatch.setattr(server.app.state.engine, "mix_adapters", mix)
    cases = [(("cats", "dogs")[i % 2], f"say something {i}") for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda c: client.chat.completions.create(
            model=c[0], messages=[{"role": "user", "content": c[1]}], max_tokens=4).choices[0].message.content, cases))
    assert all(answers) and seen
    if mix:
        assert max(len(adapters) for adapters in seen) == 2  # cats and dogs rows in one batch
    else:
        assert all(len(adapters) <= 1 for adapters in seen) and {a for s in seen for a in s} == {"cats", "dogs"}


# ---------------------------------------------------------------- bad input


def post(server: BackgroundServer, path: str, body: Any, raw: bytes | None = None) -> httpx.Response:
    if raw is not None:
        return httpx.post(f"{server.url}{path}", content=raw, headers={"content-type": "application/json"}, timeout=30)
    return httpx.post(f"{server.url}{path}", json=body, timeout=30)


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and "type" in error and "param" in error
    return error


USER = [{"role": "user", "content": "hi"}]
BAD_CHAT = {
    "unknown model": ({"model": "nope", "messages": USER}, 404),
    "path traversal as model": ({"model": "../cats", "messages": USER}, 404),
    "path inside model": ({"model": "cats/../../etc/passwd", "messages": USER}, 404),
    "messages not a list": ({"model": "cats", "messages": "hi"}, 400),
    "empty messages": ({"model": "cats", "messages": []}, 400),
    "only a system message": ({"model": "cats", "messages": [{"role": "system", "content": "x"}]}, 400),
    "unknown role": ({"model": "cats", "messages": [{"role": "wizard", "content": "x"}]}, 400),
    "content a number": ({"model": "cats", "messages": [{"role": "user", "content": 5}]}, 400),
    "max_tokens a string": ({"model": "cats", "messages": USER, "max_tokens": "10"}, 400),
    "max_tokens zero": ({"model": "cats", "messages": USER, "max_tokens": 0}, 400),
    "max_tokens over the limit": ({"model": "cats", "messages": USER, "max_tokens": 65}, 400),
    "temperature a string": ({"model": "cats", "messages": USER, "temperature": "hot"}, 400),
    "n above one": ({"model": "cats", "messages": USER, "n": 2}, 400),
    "stream not a bool": ({"model": "cats", "messages": USER, "stream": "yes"}, 400),
    "model missing": ({"messages": USER}, 400),
    "prompt over the context length": ({"model": "cats", "messages": [{"role": "user", "content": "cat " * 600}]}, 400),
    "body a list": ([1, 2], 400),
}


@pytest.mark.parametrize("case", BAD_CHAT, ids=list(BAD_CHAT))
def test_each_bad_chat_request_gets_its_4xx(server: BackgroundServer, case: str) -> None:
    body, status = BAD_CHAT[case]
    error = assert_openai_error(post(server, "/v1/chat/completions", body), status)
    if case == "prompt over the context length":
        assert error["code"] == "context_length_exceeded"
    if case == "max_tokens over the limit":
        assert error["param"] == "max_tokens"


def test_a_bad_value_of_an_optional_field_names_the_field_alone(server: BackgroundServer) -> None:
    """top_p 0 fails both branches of an optional number (> 0, and None): one problem, named by the request field,
    not by pydantic's branch tags ("top_p.constrained-float ... (and 1 more problem)")."""
    error = assert_openai_error(post(server, "/v1/chat/completions", {"model": "cats", "messages": USER, "top_p": 0}), 400)
    assert error["param"] == "top_p" and error["message"].startswith("top_p: Input should be greater than 0")
    assert "more problem" not in error["message"], error
    over = {"model": "cats", "messages": USER, "max_completion_tokens": 10**6}  # the newer name of max_tokens
    error = assert_openai_error(post(server, "/v1/chat/completions", over), 400)
    assert error["param"] == "max_completion_tokens" and error["message"].startswith("max_completion_tokens is 1000000")


def test_malformed_json_and_other_paths(server: BackgroundServer) -> None:
    assert_openai_error(post(server, "/v1/chat/completions", None, raw=b'{"model": "cats", "messages": ['), 400)
    assert_openai_error(post(server, "/v1/completions", None, raw=b"\xff\xfe not json"), 400)
    assert_openai_error(post(server, "/v1/completions", {"model": "cats", "prompt": 7}), 400)
    assert_openai_error(post(server, "/v1/completions", {"model": "cats", "prompt": ""}), 400)  # found by the fuzzer
    assert_openai_error(post(server, "/v1/completions", {"model": "cats", "prompt": ["a", "b"], "stream": True}), 400)
    assert_openai_error(httpx.get(f"{server.url}/v1/nowhere"), 404)
    assert_openai_error(httpx.get(f"{server.url}/v1/chat/completions"), 405)
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=12)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", 3]),
                                 "content": st.one_of(st.text(max_size=30), JSON)})
NEAR_VALID = st.fixed_dictionaries(
    {"model": st.sampled_from(["cats", "base", "owls", "", "../dogs", 1])},
    optional={"messages": st.lists(MESSAGE, max_size=3) | JSON, "prompt": st.text(max_size=30) | JSON,
              "max_tokens": st.integers(-5, 5000) | JSON, "temperature": st.floats(-1, 3) | JSON,
              "top_p": st.floats(-1, 2) | JSON, "stop": st.text(max_size=3) | JSON, "stream": st.booleans() | JSON,
              "n": st.integers(0, 3), "seed": JSON, "stream_options": JSON},
)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), body=NEAR_VALID | JSON)
def test_fuzzed_bodies_never_get_a_500(server: BackgroundServer, path: str, body: Any) -> None:
    response = post(server, path, body)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_openai_error(response, response.status_code)


def test_health_answers_after_the_fuzzing(server: BackgroundServer) -> None:
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


# ---------------------------------------------------------------- limits, deadlines, disconnects


@pytest.fixture
def slow_server(server: BackgroundServer, request: pytest.FixtureRequest):  # noqa: ANN201
    """A second app over the same loaded model, whose every forward step takes 50 ms."""
    engine = server.app.state.engine
    settings_ = request.param
    network = engine.model.get_base_model()  # generate() calls the transformers model, not PEFT's wrapper
    hook = network.register_forward_hook(lambda *args: time.sleep(0.05))
    app = create_app(Engine(engine.model, engine.served), settings_)
    try:
        with BackgroundServer(app) as running:
            yield running
    finally:
        hook.remove()


def metric(server: BackgroundServer, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.parametrize("slow_server", [ServeSettings(max_concurrent=1, max_tokens_limit=64)], indirect=True)
def test_requests_over_the_concurrency_limit_get_429(slow_server: BackgroundServer) -> None:
    body = {"model": "base", "messages": USER, "max_tokens": 40, "stream": True}  # the base rambles on
    with httpx.stream("POST", f"{slow_server.url}/v1/chat/completions", json=body, timeout=30) as first:
        lines = first.iter_lines()  # kept: a discarded iterator closes the response (a disconnect)
        next(lines)  # the first one is generating
        assert_openai_error(post(slow_server, "/v1/chat/completions", {"model": "dogs", "messages": USER}), 429)
    assert metric(slow_server, 'tunelab_rejected_requests_total{reason="concurrency"}') == 1


@pytest.mark.parametrize("slow_server", [ServeSettings(request_timeout_s=0.5, max_tokens_limit=64)], indirect=True)
def test_a_request_past_its_deadline_is_cancelled(slow_server: BackgroundServer) -> None:
    started = time.monotonic()
    error = assert_openai_error(post(slow_server, "/v1/chat/completions", {"model": "base", "messages": USER, "max_tokens": 60}), 408)
    assert error["code"] == "request_timeout" and time.monotonic() - started < 2.5  # 60 steps would take 3 s
    assert metric(slow_server, 'tunelab_cancelled_generations_total{reason="timeout"}') == 1
    assert metric(slow_server, "tunelab_completion_tokens_total") < 60


@pytest.mark.parametrize("slow_server", [ServeSettings(max_tokens_limit=64)], indirect=True)
def test_a_client_that_disconnects_stops_its_generation(slow_server: BackgroundServer) -> None:
    engine = slow_server.app.state.engine
    seen: list[Any] = []
    original = engine.submit
    engine.submit = lambda job: (seen.append(job.request), original(job))[-1]
    body = {"model": "base", "messages": USER, "max_tokens": 60, "stream": True}
    with httpx.stream("POST", f"{slow_server.url}/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        next(lines), next(lines)  # the role chunk, then a blank line: generation has started
    deadline = time.monotonic() + 10
    while not seen[0].done and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen[0].finish_reason == "cancelled" and len(seen[0].token_ids) < 40
    assert httpx.get(f"{slow_server.url}/health").json()["in_flight"] == 0


def test_metrics_are_prometheus_text(server: BackgroundServer) -> None:
    post(server, "/v1/chat/completions", {"model": "cats", "max_tokens": 1, "messages": USER})  # counted below
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert "# TYPE tunelab_requests_total counter" in response.text
    assert metric(server, 'tunelab_requests_total{endpoint="/v1/chat/completions",model="cats",status="200"}') >= 1
    engine = server.app.state.engine
    for i in range(3):  # the second prompt of an adapter sets its cached prefix, the third uses it
        post(server, "/v1/chat/completions", {"model": "dogs", "max_tokens": 1,
                                              "messages": [{"role": "user", "content": f"say something {i}"}]})
    assert metric(server, "tunelab_prefix_cached_tokens") == engine.batch.prefixes.reused_tokens > 0
    assert metric(server, "tunelab_prefix_cache_bytes") == engine.batch.prefixes.nbytes > 0


# ---------------------------------------------------------------- security: what may be loaded


def copy_run(run: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoints"))
    return target


def test_a_pickle_weights_file_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    bad = copy_run(runs["cats"], tmp_path, "pickled")
    torch.save({"x": torch.zeros(1)}, bad / "adapter" / "adapter_model.bin")
    with pytest.raises(ConfigError, match="pickle"):
        load_models([runs["dogs"], bad], device="cpu")
    (bad / "adapter" / "adapter_model.bin").unlink()
    (bad / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no .safetensors"):
        load_models([bad], device="cpu")


def test_an_adapter_for_another_base_is_refused(runs: dict[str, Path], tmp_path: Path, tiny_model_dir: Path) -> None:
    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other_base)
    moved = copy_run(runs["cats"], tmp_path, "elsewhere")
    config = (moved / "config.yaml").read_text().replace(str(tiny_model_dir), str(other_base))
    (moved / "config.yaml").write_text(config)
    with pytest.raises(ConfigError, match="one server serves adapters of one base"):
        load_models([runs["dogs"], moved], device="cpu")
    relabelled = copy_run(runs["cats"], tmp_path, "relabelled")
    adapter_config = json.loads((relabelled / "adapter" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(other_base)
    (relabelled / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.raises(ConfigError, match="another base"):
        load_models([runs["dogs"], relabelled], device="cpu")


def test_remote_code_needs_the_flag(runs: dict[str, Path], tmp_path: Path) -> None:
    remote = copy_run(runs["cats"], tmp_path, "remote")
    (remote / "config.yaml").write_text((remote / "config.yaml").read_text().replace("trust_remote_code: false",
                                                                                     "trust_remote_code: true"))
    with pytest.raises(ConfigError, match="--trust-remote-code"):
        load_models([remote], device="cpu")


def test_a_full_fine_tune_is_served_alone_and_not_mixed(runs: dict[str, Path], tiny_model_dir: Path, tmp_path: Path) -> None:
    from tunelab.training import train

    from support.runs import tiny_config
    from support.tiny import toy_chat_records, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", toy_chat_records(16))
    full = train(tiny_config(tiny_model_dir, data={"train": [str(data)], "val_size": 2},
                             technique={"name": "full"}, training={"max_steps": 1},
                             eval={"before_after": False, "forgetting": False},
                             output={"dir": str(tmp_path / "fullrun")}), progress=False).run_dir
    with pytest.raises(ConfigError, match="not a LoRA adapter.*serve it alone"):
        load_models([runs["cats"], full], device="cpu")
    model, served = load_models([full], device="cpu")
    assert list(served) == ["fullrun"]
    app = create_app(Engine(model, served), LIMITS)
    with BackgroundServer(app) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="fullrun", messages=USER, max_tokens=4)
        assert reply.usage.completion_tokens >= 1


def test_rows_of_one_adapter_run_it_as_the_active_adapter(client: openai.OpenAI, server: BackgroundServer,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """One client's requests ask for one adapter: its batches skip PEFT's per-row sub-batches (the active adapter
    does the same sums at once, and the answers equal the mixed batches' above); a mixed batch computes its
    rows per row, through LoRA's stacked adapters (its row_forward), not PEFT's sub-batches.
    The base's rows alone keep the adapters enabled (see below)."""
    from peft.tuners.lora.layer import Linear

    from tunelab.techniques.lora import _StackedRows

    calls, peft_calls = [], []
    mixed, stacked = Linear._mixed_batch_forward, _StackedRows.forward

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return stacked(self, *args, **kwargs)

    monkeypatch.setattr(_StackedRows, "forward", counted)
    monkeypatch.setattr(Linear, "_mixed_batch_forward", lambda *a, **k: (peft_calls.append(1), mixed(*a, **k))[1])
    ask = lambda name, text: client.chat.completions.create(  # noqa: E731
        model=name, messages=[{"role": "user", "content": text}], max_tokens=6).choices[0].message.content
    assert "cat" in ask("cats", "say something 2") and "owl" in ask("owls", "say something 2") and not calls
    engine = server.app.state.engine
    disabled, disable = [], engine.model.disable_adapter
    monkeypatch.setattr(engine.model, "disable_adapter", lambda: (disabled.append(1), disable())[1])
    # rows of the base alone go through PEFT's per-row hooks as '__base__' (every adapter skipped), not through
    # disable_adapter, which walks the model at every step
    assert ask("base", "say something 2") == ask("base", "say something 2") and not disabled
    switches = []
    set_adapter = engine.model.set_adapter
    monkeypatch.setattr(engine.model, "set_adapter", lambda *a, **k: (switches.append(a[0]), set_adapter(*a, **k)))
    ask("cats", "say something 3"), ask("cats", "say something 4")  # 6 decode steps each, one adapter
    cats = engine.served["cats"].adapter
    assert switches in ([cats], []) and engine.model.active_adapter == cats  # set once at most, not at every step
    calls.clear()  # the base's rows went through the installed row forward (every adapter skipped)
    with ThreadPoolExecutor(8) as pool:  # control: cats and dogs rows in one batch take the per-row path
        list(pool.map(lambda i: ask(["cats", "dogs"][i % 2], f"say something {i}"), range(8)))
    assert calls and not peft_calls


def test_mixed_rows_install_peft_hooks_once_and_remove_them_when_the_batch_empties(runs: dict[str, Path]) -> None:
    """PEFT's per-row adapter hooks stay installed across the decoding steps of a mixed batch (PEFT alone would
    walk the model to install and remove them at every forward pass), each step's rows still get their own
    adapters (equal to generate_batch), and nothing is left on the model once the batch is empty."""
    from peft.tuners.lora import LoraLayer

    from tunelab.generation import ContinuousBatch, GenerationRequest, Sampling, encode, generate_batch

    model, served = load_models([runs["cats"], runs["dogs"]], device="cpu")
    tokenizer = served["cats"].tokenizer
    names = {m.name: m.adapter for m in served.values()}
    hooked = lambda: sum(len(m._forward_pre_hooks) for m in model.modules() if isinstance(m, LoraLayer))  # noqa: E731
    cases = [("cats", 9), ("dogs", 5), ("base", 3), ("dogs", 9)]  # rows leave at different steps, the last two together

    def requests() -> list[GenerationRequest]:
        return [GenerationRequest(encode(tokenizer, render_chat(tokenizer, [{"role": "user", "content": f"say something {i}"}])),
                                  Sampling(n, min_new_tokens=n), adapter=a) for i, (a, n) in enumerate(cases)]

    expected = [generate_batch(model, tokenizer, [r], names)[0].token_ids for r in requests()]
    batch = ContinuousBatch(model, tokenizer, names)
    rows = requests()
    for request in rows:
        batch.add(request)
    layers, mixed_steps = sum(isinstance(m, LoraLayer) for m in model.modules()), 0
    while not batch.idle:
        mixed = len({r.adapter for r in batch.running or batch.waiting}) > 1  # the rows of this step
        batch.step()
        mixed_steps += mixed
        assert hooked() == (layers if mixed and not batch.idle else 0)
    assert [r.token_ids for r in rows] == expected and mixed_steps >= 5
    assert batch.mixed.installs == 1 and hooked() == 0
    alone = requests()[:1]  # one adapter: the active adapter, no hooks
    batch.add(alone[0])
    while not batch.idle:
        batch.step()
    assert alone[0].token_ids == expected[0] and batch.mixed.installs == 1


# ---------------------------------------------------------------- the per-adapter prompt-prefix cache


def mixed_requests(tokenizer: Any, cases: list[tuple[str, int]]) -> list:
    from tunelab.generation import GenerationRequest, Sampling, encode

    system = "you answer in a few words. the quick brown fox jumps over the lazy dog"
    return [GenerationRequest(encode(tokenizer, render_chat(tokenizer, [
        {"role": "system", "content": system}, {"role": "user", "content": f"say something {i}"}])),
        Sampling(n, min_new_tokens=n), adapter=a) for i, (a, n) in enumerate(cases)]


def test_cached_prefixes_are_per_adapter_and_mixed_rows_get_what_they_get_alone(runs: dict[str, Path]) -> None:
    """Rows of two adapters and the base in one batch, each prefilled over its own adapter's cached prefix, get
    what generate_batch gives each alone; the same batch without the cache gives the same. Negative control: the
    base's rows given the cats adapter's cached keys and values (the same tokens) get other tokens."""
    from tunelab.generation import ContinuousBatch, _Prefix, generate_batch

    model, served = load_models([runs["cats"], runs["dogs"]], device="cpu")
    tokenizer = served["cats"].tokenizer
    names = {m.name: m.adapter for m in served.values()}
    cases = [("cats", 6), ("dogs", 4), ("base", 5), ("cats", 3), ("dogs", 6), ("base", 2)]
    expected = [generate_batch(model, tokenizer, [r], names)[0].token_ids for r in mixed_requests(tokenizer, cases)]

    def serve(batch: ContinuousBatch) -> list[list[int]]:
        for first in mixed_requests(tokenizer, cases[:3]) + mixed_requests(tokenizer, cases[3:]):  # learn, one by one
            batch.add(first)
            while not batch.idle:
                batch.step()
        rows = mixed_requests(tokenizer, cases)
        for request in rows:  # then all together: mixed adapters and the base, each over its own prefix
            batch.add(request)
        while not batch.idle:
            batch.step()
        return [r.token_ids for r in rows]

    cached = ContinuousBatch(model, tokenizer, names)
    assert serve(cached) == expected == serve(ContinuousBatch(model, tokenizer, names, prefix_tokens=0))
    entries = cached.prefixes.entries
    assert set(entries) == {"default", "served1", "__base__"} and cached.prefixes.reused_tokens > 0
    assert entries["default"].tokens == entries["__base__"].tokens  # the same tokens ...
    assert not torch.equal(entries["default"].values[0], entries["__base__"].values[0])  # ... other values
    entries["__base__"] = _Prefix(entries["__base__"].tokens, entries["default"].keys, entries["default"].values)
    rows = mixed_requests(tokenizer, cases)
    for request in rows:
        cached.add(request)
    while not cached.idle:
        cached.step()
    assert [r.token_ids for r, (a, _) in zip(rows, cases) if a == "base"] != \
        [e for e, (a, _) in zip(expected, cases) if a == "base"]


def test_cached_prefixes_are_dropped_when_an_adapter_is_loaded_or_deleted(runs: dict[str, Path]) -> None:
    """The cached keys and values are those of the adapters at the time: loading or deleting one drops them (the
    next step sees PEFT's adapters changed)."""
    from tunelab.generation import ContinuousBatch

    model, served = load_models([runs["cats"], runs["dogs"]], device="cpu")
    tokenizer = served["cats"].tokenizer
    batch = ContinuousBatch(model, tokenizer, {m.name: m.adapter for m in served.values()})

    def learn() -> None:
        for request in mixed_requests(tokenizer, [("dogs", 2), ("dogs", 2)]):
            batch.add(request)
            while not batch.idle:
                batch.step()

    learn()
    assert set(batch.prefixes.entries) == {"served1"}
    batch.step()  # nothing changed: kept
    assert set(batch.prefixes.entries) == {"served1"}
    model.load_adapter(find_adapter(runs["owls"]), adapter_name="later", is_trainable=False)
    batch.step()
    assert not batch.prefixes.entries
    learn()
    model.delete_adapter("later")
    batch.step()
    assert not batch.prefixes.entries


def find_adapter(run: Path) -> Path:
    from tunelab.result import find_result

    return find_result(run).result_dir


# ---------------------------------------------------------------- LoRA's stacked rows (its row_forward)


def two_lora_model(model_dir: Path, **extra: Any) -> Any:
    """The tiny model with two LoRA adapters of other ranks and scalings, B not zero (trained-like)."""
    from peft import LoraConfig, get_peft_model

    from support.tiny import fresh_model

    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(fresh_model(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                              init_lora_weights=False, **extra), adapter_name="one")
    model.add_adapter("two", LoraConfig(r=2, lora_alpha=7, target_modules=targets, init_lora_weights=False, **extra))
    return model.eval()


def test_stacked_rows_compute_what_peft_per_row_adapters_compute(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    """LoRA's row_forward (each layer's adapters stacked, each row keeping its own rank columns) gives every row of
    a batch that mixes two adapters of other ranks and the base the logits of PEFT's per-row path and of the row
    run alone with its adapter, and the same greedy tokens in a ContinuousBatch. Negative controls: the names
    of two rows swapped change those rows; a batch with fewer names than rows is refused."""
    from tunelab.generation import PEFT_BASE, ContinuousBatch, GenerationRequest, Sampling
    from tunelab.techniques.lora import TECHNIQUE, stacked_rows

    assert TECHNIQUE.row_forward is stacked_rows
    model = two_lora_model(tiny_model_dir)
    torch.manual_seed(1)
    ids = torch.randint(3, 60, (5, 7))  # (B, T)
    names = ["one", "two", PEFT_BASE, "two", "one"]
    with torch.no_grad():
        peft = model(input_ids=ids, adapter_names=names).logits  # (B, T, V)
        alone = []
        for row, name in enumerate(names):
            if name == PEFT_BASE:
                with model.disable_adapter():
                    alone.append(model(input_ids=ids[row:row + 1]).logits[0])
            else:
                model.set_adapter(name)
                alone.append(model(input_ids=ids[row:row + 1]).logits[0])
        rows = list(names)
        with stacked_rows(model, rows):
            stacked = model(input_ids=ids).logits
            rows[:2] = rows[1::-1]  # negative control: rows 0 and 1 swap adapters
            swapped = model(input_ids=ids).logits
            rows[:] = names[:4]
            with pytest.raises(ValueError, match="5 rows in the batch but 4 adapter names"):
                model(input_ids=ids)
        assert not any("forward" in vars(m) for m in model.modules())  # nothing left on the layers
    torch.testing.assert_close(stacked, peft, rtol=0, atol=1e-5)
    torch.testing.assert_close(stacked, torch.stack(alone), rtol=0, atol=1e-5)
    assert (stacked[:2] - swapped[:2]).abs().amax() > 1e-2 and torch.equal(stacked[2:], swapped[2:])

    def tokens(row_forward: Any) -> list[list[int]]:
        batch = ContinuousBatch(model, tiny_tokenizer, {"one": "one", "two": "two", "base": PEFT_BASE}, prefix_tokens=0,
                                row_forward=row_forward)
        requests = [GenerationRequest(ids[i].tolist(), Sampling(6, min_new_tokens=6), adapter="base" if n == PEFT_BASE else n)
                    for i, n in enumerate(names)]
        for request in requests:
            batch.add(request)
        while not batch.idle:
            batch.step()
        assert batch.mixed.own == (row_forward is not None) and batch.mixed.installs == 1
        return [r.token_ids for r in requests]

    assert tokens(stacked_rows) == tokens(None)


def test_stacked_rows_over_a_bfloat16_base_round_as_one_adapter_does(tiny_model_dir: Path) -> None:
    """Served in bfloat16 (float32 adapters over bfloat16 base weights), a stacked row adds its adapter's float32
    term to the base output and rounds once, as PEFT's one-adapter forward does (what the row gets alone, and
    offline generation): bitwise equal. Rounding the term to bfloat16 before the addition (what PEFT's per-row
    path does) gave other tokens from a bfloat16 SmolLM2."""
    from peft.tuners.lora.layer import LoraLayer

    from tunelab.generation import PEFT_BASE
    from tunelab.techniques.lora import stacked_rows

    model = two_lora_model(tiny_model_dir)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer.base_layer.to(torch.bfloat16)
    torch.manual_seed(2)
    layer = layers[0]
    x = torch.randn(4, 6, layer.in_features).to(torch.bfloat16)  # (B, T, d_in)
    names = ["two", "one", PEFT_BASE, "two"]
    with torch.no_grad():
        alone = []
        for row, name in enumerate(names):
            if name == PEFT_BASE:
                with model.disable_adapter():
                    alone.append(layer(x[row:row + 1]))
            else:
                model.set_adapter(name)
                alone.append(layer(x[row:row + 1]))  # (1, T, d_out) bfloat16
        with stacked_rows(model, names):
            stacked = layer(x)
    assert stacked.dtype == torch.bfloat16
    assert torch.equal(stacked, torch.cat(alone))


def test_stacked_rows_of_a_row_invariant_model_pad_their_adapter_products(tiny_model_dir: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Served in bfloat16 on a CPU the model is row-invariant (tunelab.invariance): a decoding row's adapter
    products (x A_s^T, then B_s), like its base layer's, run with at least MIN_ROWS rows, as the row's products
    run alone: a one-row product takes another kernel, which rounds otherwise."""
    import types

    import torch.nn.functional as F
    from peft.tuners.lora.layer import LoraLayer

    from tunelab import invariance
    from tunelab.techniques.lora import stacked_rows

    model = two_lora_model(tiny_model_dir)
    invariance.make_row_invariant(model)
    rows = []
    spy = types.SimpleNamespace(**{**vars(F), "linear": lambda x, w, b=None: (rows.append(x.shape[0]), F.linear(x, w, b))[1]})
    monkeypatch.setattr(invariance, "F", spy)
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    with torch.no_grad(), stacked_rows(model, ["one"]):
        layer(torch.randn(1, 1, layer.in_features))  # one row decoding
    assert rows == [invariance.MIN_ROWS] * 3  # the base layer's product, then the adapters' two


def test_stacked_rows_leave_other_lora_layers_to_peft(tiny_model_dir: Path) -> None:
    """A model holding a layer the stacked forward does not compute (DoRA's magnitudes, a LoRA bias) gets None: the
    batch uses PEFT's per-row path there (PEFT itself refuses adapter_names with DoRA)."""
    from tunelab.techniques.lora import stacked_rows

    assert stacked_rows(two_lora_model(tiny_model_dir), ["one"]) is not None
    assert stacked_rows(two_lora_model(tiny_model_dir, use_dora=True), ["one"]) is None
    assert stacked_rows(two_lora_model(tiny_model_dir, lora_bias=True), ["one"]) is None


def test_stacked_rows_follow_an_adapter_replaced_under_its_name(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    """The stacked adapters are those of the time: an adapter deleted and another loaded under the same name while
    its row is decoding gives that row the new weights from the batch's next step on (the batch sees PEFT's
    adapters change and installs the stacks anew), as PEFT's per-row path does. Negative control: without the
    replacement the row gets other tokens."""
    from peft import LoraConfig

    from tunelab.generation import PEFT_BASE, ContinuousBatch, GenerationRequest, Sampling
    from tunelab.techniques.lora import stacked_rows

    def serve(row_forward: Any, replace: bool = True) -> list[list[int]]:
        model = two_lora_model(tiny_model_dir)
        batch = ContinuousBatch(model, tiny_tokenizer, {"one": "one", "two": "two", "base": PEFT_BASE},
                                prefix_tokens=0, row_forward=row_forward)
        requests = [GenerationRequest(p, Sampling(12, min_new_tokens=12), adapter=a)
                    for p, a in [([5, 9, 14, 20], "one"), ([7, 3, 30, 11], "two"), ([12, 40, 8, 6], "base")]]
        for request in requests:
            batch.add(request)
        for _ in range(3):  # the prefill and two decoding steps, the rows mixed
            batch.step()
        if replace:
            model.delete_adapter("two")
            torch.manual_seed(5)
            model.add_adapter("two", LoraConfig(r=2, lora_alpha=7, target_modules=["q_proj", "v_proj", "down_proj"],
                                                init_lora_weights=False))
            model.eval()
        while not batch.idle:
            batch.step()
        return [r.token_ids for r in requests]

    replaced = serve(stacked_rows)
    assert replaced == serve(None)
    kept = serve(stacked_rows, replace=False)
    assert replaced[1][:3] == kept[1][:3] and replaced[1] != kept[1] and replaced[0::2] == kept[0::2]
