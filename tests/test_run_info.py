"""run_info.json after a resume: the sessions the run already spent count (the end-to-end Ctrl-C test in
test_interrupt.py checks the sums on a real resumed run; here, one session's peak above the other's)."""

from __future__ import annotations

from tunelab.run_info import RunInfo, own_peak_rss_bytes


def test_a_resumed_run_reports_its_highest_session_peak_and_its_whole_tokens_per_second() -> None:
    earlier = {"started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:01:00+00:00", "wall_time_s": 60.0,
               "phases_s": {"set-up": 10.0, "training": 40.0}, "training_tokens": 4000,
               "peak_memory": {"rss_bytes": 2**40, "rss_gib": 1024.0}}  # far above this test process's peak
    info = RunInfo()
    info.continue_from(earlier)
    with info.phase("training"):
        pass
    report = info.as_dict("completed", training_tokens=1000, world_size=1)
    assert report["peak_memory"] == {"rss_bytes": 2**40, "rss_gib": 1024.0}
    assert report["sessions"][1]["peak_memory"]["rss_bytes"] <= own_peak_rss_bytes() < 2**40
    assert report["training_tokens"] == 5000 and report["started"] == earlier["started"]
    assert report["tokens_per_s"] == round(5000 / report["phases_s"]["training"], 1)
    assert 40.0 <= report["phases_s"]["training"] < 41.0 and report["phases_s"]["set-up"] == 10.0


def test_a_run_never_resumed_lists_no_sessions() -> None:
    info = RunInfo()
    info.continue_from(None)  # a resume whose earlier session left no run_info.json (it crashed)
    report = info.as_dict("completed", training_tokens=10, world_size=1)
    assert "sessions" not in report and report["training_tokens"] == 10
