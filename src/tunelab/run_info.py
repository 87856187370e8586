"""run_info.json: what a run cost and where it ran — parameters, peak memory, wall time per phase, tokens/s,
library versions and hardware. Written at the end of every run (also when it stops early or fails), so a
report or ``tunelab runs`` never has to parse logs."""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "tunelab")


class RunInfo:
    def __init__(self) -> None:
        self.started = datetime.now(timezone.utc)
        self.phases: dict[str, float] = {}
        self.figures: dict[str, Any] = {}
        self._open: list[tuple[str, float]] = []  # nested phases: (name, time it last resumed)
        self.earlier: list[dict[str, Any]] = []  # the sessions before a resume, as their run_info.json said

    def continue_from(self, previous: dict[str, Any] | None) -> None:
        """Count the sessions an interrupted run already spent (its run_info.json, written when it stopped), so a
        resumed run's wall time, phases, tokens and peak memory are the whole run's, not the last session's."""
        if isinstance(previous, dict) and previous.get("wall_time_s") is not None:
            self.earlier = list(previous.get("sessions") or [_session(previous)])

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the wall time of the block to phase ``name`` (a phase may run more than once). A phase opened
        inside another pauses it, so the phases add up to the wall time instead of counting it twice."""
        now = time.perf_counter()
        if self._open:
            self._stop(now)
        self._open.append((name, now))
        try:
            yield
        finally:
            now = time.perf_counter()
            self._stop(now)
            self._open.pop()
            if self._open:
                self._open[-1] = (self._open[-1][0], now)

    def _stop(self, now: float) -> None:
        name, since = self._open[-1]
        self.phases[name] = round(self.phases.get(name, 0.0) + now - since, 3)
        self._open[-1] = (name, now)

    def as_dict(self, status: str, training_tokens: int, world_size: int) -> dict[str, Any]:
        """run_info.json. After a resume every figure covers all the sessions (``sessions`` lists each one):
        wall time, phases and tokens add up, tokens/s is their ratio, and the peak is the highest session's."""
        finished = datetime.now(timezone.utc)
        this = {"started": self.started.isoformat(timespec="seconds"), "finished": finished.isoformat(timespec="seconds"),
                "wall_time_s": round((finished - self.started).total_seconds(), 3), "phases_s": dict(self.phases),
                "training_tokens": training_tokens, "peak_memory": peak_memory()}
        sessions = [*self.earlier, this]
        phases: dict[str, float] = {}
        for session in sessions:
            for name, seconds in session["phases_s"].items():
                phases[name] = round(phases.get(name, 0.0) + seconds, 3)
        tokens = sum(session["training_tokens"] for session in sessions)
        training_s = phases.get("training", 0.0)
        return {
            "status": status,
            "started": sessions[0]["started"],
            "finished": this["finished"],
            "wall_time_s": round(sum(session["wall_time_s"] for session in sessions), 3),  # time running, no pauses
            "phases_s": phases,
            **self.figures,
            "training_tokens": tokens,
            "tokens_per_s": round(tokens / training_s, 1) if training_s else None,
            "peak_memory": _highest([session["peak_memory"] for session in sessions]),
            **({"sessions": sessions} if self.earlier else {}),
            "world_size": world_size,
            "versions": versions(),
            "hardware": hardware(),
        }


def _session(info: dict[str, Any]) -> dict[str, Any]:
    """One session's own figures, from a run_info.json written before sessions were listed."""
    return {"started": info.get("started"), "finished": info.get("finished"), "wall_time_s": info["wall_time_s"],
            "phases_s": dict(info.get("phases_s") or {}), "training_tokens": int(info.get("training_tokens") or 0),
            "peak_memory": dict(info.get("peak_memory") or {})}


def _highest(peaks: list[dict[str, Any]]) -> dict[str, Any]:
    """The peak memory of several sessions: each figure's highest value (the GiB figures follow their bytes)."""
    result: dict[str, Any] = {}
    for key in ("rss_bytes", "gpu_max_allocated_bytes"):
        values = [peak[key] for peak in peaks if peak.get(key) is not None]
        if values:
            result[key] = max(values)
            result[key.replace("_bytes", "_gib")] = round(max(values) / 2**30, 3)
    return result


def own_peak_rss_bytes() -> int:
    """This process's own peak resident memory: on Linux its address space's high-water mark (VmHWM in
    /proc/self/status), elsewhere ru_maxrss (KiB on Linux, bytes on macOS).

    Not ru_maxrss on Linux: the kernel carries the starting process's peak into it across exec (a child started by
    subprocess reports at least its parent's peak RSS), so a run, the planner's runtime probe or a grid cell
    started by a large process would read that process's memory as its own (measured: a Python child of an
    800 MiB parent reports 813 MiB in ru_maxrss)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def peak_memory() -> dict[str, Any]:
    """Peak resident memory of this process (``own_peak_rss_bytes``) and, on a GPU, the most memory torch ever
    allocated on it."""
    rss_bytes = own_peak_rss_bytes()
    result: dict[str, Any] = {"rss_bytes": rss_bytes, "rss_gib": round(rss_bytes / 2**30, 3)}
    import torch

    if torch.cuda.is_available():
        allocated = torch.cuda.max_memory_allocated()
        result.update(gpu_max_allocated_bytes=allocated, gpu_max_allocated_gib=round(allocated / 2**30, 3))
    return result


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _cpu_model() -> str | None:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None
