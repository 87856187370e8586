"""The web UI, served by the same process as the API: a single page (no CDN, no build step) that chats with any
served model side by side with the base, lists the runs with their loss curves and evaluation figures, opens
their evaluation reports and compares runs. It reads runs through the same functions as `tunelab runs`.

Run names in URLs are looked up among the folders of ``runs_root``; they never become paths themselves. A
comparison (a ``tunelab compare --out`` folder in ``runs_root``) is one group: its runs are named
``<compare>/<run>`` (the only names with a slash, matched whole against the listed ones), and its own report is
served from its folder."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse

from tunelab.runs import list_run_groups, read_json, run_details
from tunelab.serve.errors import APIError


def run_name(summary: dict[str, Any]) -> str:
    """A run's name in the UI and its URLs: its folder's name, under its comparison's name when it has one."""
    folder = Path(summary["run"]).name
    return f"{summary['group']}/{folder}" if summary.get("group") else folder


def _runs(root: Path) -> dict[str, Path]:
    return {run_name(s): Path(s["run"]) for s in list_run_groups(root)[0]}


def add_ui(app: FastAPI, runs_root: Path) -> None:
    page = resources.files("tunelab.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    def find(name: str) -> Path:
        runs = _runs(runs_root)
        if name not in runs:
            raise APIError(404, f"no run named '{name[:100]}' in {runs_root}", type_="not_found_error", param="run")
        return runs[name]

    def served(summary: dict[str, Any]) -> bool:
        """Whether the server answers with this run: a served folder is this run's folder or inside it (its
        adapter folder). By folder, not by name: a comparison's run and a run of the root may share a name."""
        folders = {model.run_dir.resolve() for model in app.state.engine.served.values() if model.run_dir is not None}
        run = Path(summary["run"]).resolve()
        return any(folder == run or run in folder.parents for folder in folders)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/ui/api/runs", include_in_schema=False)
    async def runs() -> dict[str, Any]:
        found, groups = list_run_groups(runs_root)
        return {"root": str(runs_root), "runs": [{**s, "name": run_name(s), "served": served(s)} for s in found],
                "groups": [{k: v for k, v in g.items() if k != "path"} for g in groups]}

    # ``path``: a run of a comparison is named <compare>/<run>; the name is only ever a key of the listed runs
    @app.get("/ui/api/runs/{name:path}", include_in_schema=False)
    async def run(name: str) -> dict[str, Any]:
        run_dir = find(name)
        details = run_details(run_dir)
        return {"name": name, **details,
                "quantize": read_json(run_dir / "quantize.json")}

    @app.get("/ui/runs/{name:path}/evals/{evaluation}/report.html", include_in_schema=False)
    async def eval_report(name: str, evaluation: str) -> FileResponse:
        run_dir = find(name)
        allowed = {str(Path(e).parent.name): run_dir / Path(e).parent / "report.html" for e in run_details(run_dir)["evaluations"]}
        if evaluation not in allowed or not allowed[evaluation].is_file():
            raise APIError(404, f"run '{name}' has no evaluation report '{evaluation[:100]}'", type_="not_found_error")
        return FileResponse(allowed[evaluation], media_type="text/html")

    @app.get("/ui/compares/{group}/report.html", include_in_schema=False)
    async def compare_report(group: str) -> FileResponse:
        reports = {g["name"]: Path(g["path"]) / "report.html" for g in list_run_groups(runs_root)[1] if g["report"]}
        if group not in reports or not reports[group].is_file():
            raise APIError(404, f"no comparison report named '{group[:100]}' in {runs_root}", type_="not_found_error")
        return FileResponse(reports[group], media_type="text/html")
