"""The web UI, served by the same process as the API: a single page (no CDN, no build step) that chats with any
served model side by side with the base, lists the runs with their loss curves and evaluation figures, opens
their evaluation reports and compares runs. It reads runs through the same functions as `tunelab runs`.

Run names in URLs are looked up among the folders of ``runs_root``; they never become paths themselves."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse

from tunelab.runs import list_runs, read_json, run_details
from tunelab.serve.errors import APIError


def _runs(root: Path) -> dict[str, Path]:
    return {Path(s["run"]).name: Path(s["run"]) for s in list_runs(root)}


def add_ui(app: FastAPI, runs_root: Path) -> None:
    page = resources.files("tunelab.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    def find(name: str) -> Path:
        runs = _runs(runs_root)
        if name not in runs:
            raise APIError(404, f"no run named '{name[:100]}' in {runs_root}", type_="not_found_error", param="run")
        return runs[name]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/ui/api/runs", include_in_schema=False)
    async def runs() -> dict[str, Any]:
        served = set(app.state.engine.served)
        return {"root": str(runs_root),
                "runs": [{**s, "name": Path(s["run"]).name, "served": Path(s["run"]).name in served}
                         for s in list_runs(runs_root)]}

    @app.get("/ui/api/runs/{name}", include_in_schema=False)
    async def run(name: str) -> dict[str, Any]:
        run_dir = find(name)
        details = run_details(run_dir)
        return {"name": name, **details,
                "quantize": read_json(run_dir / "quantize.json")}

    @app.get("/ui/runs/{name}/evals/{evaluation}/report.html", include_in_schema=False)
    async def eval_report(name: str, evaluation: str) -> FileResponse:
        run_dir = find(name)
        allowed = {str(Path(e).parent.name): run_dir / Path(e).parent / "report.html" for e in run_details(run_dir)["evaluations"]}
        if evaluation not in allowed or not allowed[evaluation].is_file():
            raise APIError(404, f"run '{name}' has no evaluation report '{evaluation[:100]}'", type_="not_found_error")
        return FileResponse(allowed[evaluation], media_type="text/html")
