"""Starting the server: in the foreground (`tunelab serve`) or on a background thread (tests, notebooks)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError
from tunelab.serve.app import ServeSettings, create_app
from tunelab.serve.engine import Engine, NoModels, load_models


def build_app(runs: list[Path], settings: ServeSettings | None = None, device: Any = None,
              allow_remote_code: bool = False) -> Any:
    """Load the runs (checked: same base, safetensors only; in ``settings.dtype``) and return the FastAPI app
    over them."""
    settings = settings or ServeSettings()
    model, served = load_models(runs, device=device, allow_remote_code=allow_remote_code, dtype=settings.dtype)
    engine = Engine(model, served, max_batch_size=settings.max_batch_size, mix_adapters=settings.mix_adapters,
                    continuous=settings.continuous)
    return create_app(engine, settings)


def build_ui_app(runs: list[Path], settings: ServeSettings, device: Any = None, allow_remote_code: bool = False) -> Any:
    """`tunelab ui`: the app `tunelab serve` builds over ``runs`` (the API the page chats through included), or,
    with no run, the same page and run browser over ``settings.runs_root`` with no model loaded."""
    if settings.runs_root is None or not settings.runs_root.is_dir():
        raise ConfigError(f"--runs-root {settings.runs_root}: not a folder; give the folder that holds your run "
                          "folders (tunelab train writes them under runs/ by default)")
    if runs:
        return build_app(runs, settings, device=device, allow_remote_code=allow_remote_code)
    return create_app(NoModels(), settings)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (127.0.0.0/8, ::1, 'localhost')."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning `tunelab serve` and `tunelab ui` print when they listen beyond this machine without a key."""
    if api_key is not None or is_loopback(host):
        return None
    return (f"warning: listening on {host} without an API key: anyone who can reach this address can generate with "
            "the served models and read the runs (their configs, data paths, figures and reports). Set --api-key "
            "(or TUNELAB_API_KEY), or listen on 127.0.0.1 behind a proxy that authenticates")


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


class BackgroundServer:
    """uvicorn on a thread, on a free local port; ``url`` is its base address. Use as a context manager."""

    def __init__(self, app: Any, host: str = "127.0.0.1") -> None:
        import uvicorn

        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        self.app, self.url = app, f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.app.state.engine.close()
