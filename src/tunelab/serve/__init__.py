"""Serving runs: an OpenAI-compatible API over one base with many adapters (``app``, ``engine``), and the web UI."""
