"""Helpers shared by the test modules (no test module imports another; conftest's fixtures call these too).

- `support.tiny`: the tiny tokenizer and Llama built in-process, a fresh copy of the tiny model, the toy data;
- `support.runs`: configs on the tiny model (`tiny_config`: exactly the sections given; `tiny_run_config`: the
  tiny run most training tests start from, with overrides) and reading a run's checkpoints;
- `support.trained`: three tiny LoRA runs trained once per session (generate/chat, serve, export tests);
- `support.batches`: a collated toy batch and its loss, for tests that drive a technique without the loop;
- `support.greedy`: greedy generation with plain transformers, the reference a served model must match;
- `support.cli`: the CLI through typer's runner, with a wide console and the colours stripped;
- `support.ddp_driver`: the torchrun driver, and `StopAfter`, the Ctrl-C stand-in it shares with the tests.

`tests/` is on `sys.path` (pytest puts the root conftest's folder there; scripts/mutants.py does the same), so
tests write `from support.tiny import write_jsonl`.
"""
