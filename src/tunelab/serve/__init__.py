"""Serving runs: an OpenAI-compatible API over one base with many adapters (``app``, ``engine``), and the web UI."""

# The largest request body a server takes by default (--max-body-bytes): far above any chat a context window holds
# (a 128k-token conversation is about 0.5 MB of text), small enough that a flood of large bodies is cheap to refuse.
# Here rather than in app.py so that the CLI can show it without importing FastAPI or pydantic.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024

# How the engine's worker schedules (`tunelab serve --scheduling`, hidden: benchmarks/serve.py sets it), as
# (continuous, mixed adapters). 'continuous' is the server as it runs; the others are the benchmark's comparison
# points: the scheduling the server had before continuous batching (a batch runs to its end before the next
# starts), and continuous batching without mixed-adapter batches (the running rows all ask for one adapter).
SCHEDULINGS = {"continuous": (True, True), "whole-batch": (False, True), "per-adapter": (True, False)}
