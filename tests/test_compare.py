"""tunelab compare on the tiny model: every column equals an independent measurement, a seed repeat gives the
same numbers, Ctrl-C mid-compare then the same command again gives the same compare.json; the Pareto flag and
the Student-t interval on constructed inputs."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors import safe_open

from support.runs import tiny_config, tiny_config_dict
from support.tiny import toy_chat_records, write_jsonl
from tunelab.compare.stats import mean_interval, pareto_flags, t_quantile
from tunelab.compare.table import flag_pareto, primary_metric
from tunelab.config import ConfigError

# what a run's own process measured: differs between two runs of the same config; the Pareto flag too, since
# memory and wall time are two of its three axes (checked against the row's own figures instead)
MEASURED = {"peak_memory_bytes", "wall_time_s", "tokens_per_s", "pareto"}


def test_pareto_flag_on_a_constructed_table() -> None:
    # (quality cost, memory, time): b is dominated by a; c trades memory for time; d ties a exactly (both kept)
    costs = [(1.0, 10.0, 5.0), (1.0, 12.0, 5.0), (2.0, 4.0, 9.0), (1.0, 10.0, 5.0), (3.0, 20.0, 1.0), (3.0, 20.0, 2.0)]
    assert pareto_flags(costs) == [True, False, True, True, True, False]


def test_pareto_over_rows_reads_higher_is_better() -> None:
    def row(score: float, memory: float, seconds: float) -> dict[str, Any]:
        return {"metrics": {"rouge_l": {"mean": score}}, "peak_memory_bytes": {"mean": memory},
                "wall_time_s": {"mean": seconds}}

    rows = [row(0.9, 10, 10), row(0.5, 10, 10), row(0.5, 5, 10)]
    flag_pareto(rows, ("rouge_l", True))
    assert [r["pareto"] for r in rows] == [True, False, True]
    flag_pareto(rows, ("rouge_l", False))  # lower is better: the 0.9 row is now dominated by the cheaper 0.5 one
    assert [r["pareto"] for r in rows] == [False, False, True]


def test_t_interval_matches_closed_forms() -> None:
    for p in (0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-6)  # Cauchy
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-6)
    summary = mean_interval([1.0, 2.0, 4.0])
    half = t_quantile(0.975, 2) * statistics.stdev([1.0, 2.0, 4.0]) / math.sqrt(3)
    assert (summary["low"], summary["high"]) == pytest.approx((7 / 3 - half, 7 / 3 + half))
    assert mean_interval([3.0])["low"] is None
    # a cost cannot be negative: two seeds' wide interval is cut at its floor (the high end is not moved)
    cut, wide = mean_interval([10.0, 1000.0], floor=0.0), mean_interval([10.0, 1000.0])
    assert wide["low"] < 0 and cut["low"] == 0.0 and cut["high"] == wide["high"]
    from tunelab.compare.table import technique_row

    runs = [{"run": f"r{i}", "metrics": {}, "higher_is_better": {}, "forgetting_change": None,
             "forgetting_flagged": None, "trainable_parameters": 1, "peak_memory_bytes": 1.0, "wall_time_s": t,
             "tokens_per_s": 1.0, "artefact_bytes": 1.0, "training_tokens": 1.0} for i, t in enumerate((10.0, 1000.0))]
    assert technique_row("lora", 1e-4, runs)["wall_time_s"]["low"] == 0.0


def _config(tiny_model_dir: Path, tmp_path: Path, steps: int) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(48))
    config = tmp_path / f"compare-{steps}.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(
        tiny_model_dir,
        data={"train": [str(data)], "val_size": 4, "max_length": 64, "packing": False},
        technique={"name": "lora", "r": 4},
        training={"max_steps": steps, "micro_batch_size": 2, "eval_every": steps, "eval_metrics": ["chrf"]},
        eval={"num_samples": 2, "max_new_tokens": 4, "metrics": ["rouge_l"], "forgetting": True},
    )))
    return config


def _tunelab(*args: str) -> list[str]:
    return [sys.executable, "-m", "tunelab", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _compare(config: Path, out: Path, seeds: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(_tunelab("compare", str(config), "--techniques", "lora,prompt_tuning", "--seeds", str(seeds),
                                   "--out", str(out)), env=ENV, capture_output=True, text=True, timeout=900)


def _without_measured(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_measured(v) for k, v in value.items() if k not in MEASURED}
    if isinstance(value, list):
        return [_without_measured(v) for v in value]
    return value


def _safetensors_numel(path: Path) -> int:
    with safe_open(str(path), "pt") as handle:
        return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())


def _bytes_on_disk(folder: Path) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def _interrupt_during(command: list[str], metrics: Path) -> str:
    """Start ``command``, Ctrl-C it once the run writing ``metrics`` has logged 2 training steps; its output."""
    # A background job of a non-interactive shell (CI scripts, `cmd &`) starts with SIGINT ignored, and a Python
    # started so keeps ignoring it (no KeyboardInterrupt): give the compare a terminal's default Ctrl-C.
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count('"train"') >= 2):
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 130, output
    return output


def test_compare_columns_seed_repeat_and_resume(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = _config(tiny_model_dir, tmp_path, steps=30)
    out = tmp_path / "cmp"
    command = _tunelab("compare", str(config), "--techniques", "lora,prompt_tuning", "--seeds", "2", "--out", str(out))

    # Ctrl-C during the third run (prompt_tuning, first seed), then the same command finishes the compare
    third = out / "prompt_tuning-seed42"
    _interrupt_during(command, third / "metrics.jsonl")
    assert json.loads((third / "status.json").read_text())["status"] == "interrupted"
    assert json.loads((out / "lora-seed43" / "status.json").read_text())["status"] == "completed"
    assert not (out / "prompt_tuning-seed43").exists()
    resumed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "completed earlier, kept" in resumed.stderr and "resuming" in resumed.stderr
    result = json.loads((out / "compare.json").read_text())
    assert "| technique |" in (out / "report.md").read_text()
    page = (out / "report.html").read_text()  # self-contained: the plots inline, nothing fetched
    assert page.count("<svg") == 2 and page.count("<polyline") == 4 and page.count("<circle") == 2
    assert not re.search(r"(src|href)=|<script|<link|@import|url\(", page)

    # every column against an independent measurement of the run folders
    for row in result["techniques"]:
        runs = [out / name for name in row["runs"]]
        adapter_files = [r / "adapter" / "adapter_model.safetensors" for r in runs]
        assert row["trainable_parameters"] == _safetensors_numel(adapter_files[0])
        sizes = [_bytes_on_disk(r / "adapter") for r in runs]
        assert row["artefact_bytes"]["mean"] == pytest.approx(statistics.mean(sizes))
        losses = [json.loads((r / "eval.json").read_text())["tuned"]["loss"] for r in runs]
        half = math.tan(math.pi * 0.475) * statistics.stdev(losses) / math.sqrt(2)  # t(0.975, df=1), closed form
        assert row["metrics"]["val_loss"]["mean"] == pytest.approx(statistics.mean(losses))
        assert row["metrics"]["val_loss"]["high"] == pytest.approx(statistics.mean(losses) + half, rel=1e-6)
        rouge = [json.loads((r / "eval.json").read_text())["metrics"]["rouge_l"]["tuned"] for r in runs]
        assert row["metrics"]["rouge_l"]["mean"] == pytest.approx(statistics.mean(rouge))
        chrf = [[json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()
                 if '"eval"' in line][-1]["chrf"] for r in runs]
        assert row["metrics"]["chrf@last_eval"]["mean"] == pytest.approx(statistics.mean(chrf))
        infos = [json.loads((r / "run_info.json").read_text()) for r in runs]
        assert row["peak_memory_bytes"]["mean"] == pytest.approx(statistics.mean(i["peak_memory"]["rss_bytes"] for i in infos))
        assert row["wall_time_s"]["mean"] == pytest.approx(statistics.mean(i["wall_time_s"] for i in infos))
        assert row["tokens_per_s"]["mean"] == pytest.approx(statistics.mean(i["tokens_per_s"] for i in infos))
        forgetting = [json.loads((r / "eval.json").read_text())["forgetting"]["relative_change"] for r in runs]
        assert row["forgetting_change"]["mean"] == pytest.approx(statistics.mean(forgetting))
    lora, prompt = result["techniques"]
    assert lora["training_tokens"] == prompt["training_tokens"], "the same token budget for every technique"
    assert lora["learning_rate"] == 2e-4 and prompt["learning_rate"] != lora["learning_rate"]

    # the interrupted run trained again without a break, alone: the same numbers (a seed repeat)
    again = tmp_path / "again"
    alone = subprocess.run(_tunelab("compare", str(config), "--techniques", "prompt_tuning", "--out", str(again)),
                           env=ENV, capture_output=True, text=True, timeout=900)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    repeat = json.loads((again / "compare.json").read_text())["runs"]
    assert _without_measured(repeat) == _without_measured([r for r in result["runs"] if r["run"] == third.name])

    # and the compare with that uninterrupted run in its place: the same compare.json
    whole = tmp_path / "whole"
    shutil.copytree(out, whole)
    shutil.rmtree(whole / third.name)
    shutil.copytree(again / third.name, whole / third.name)
    kept = subprocess.run([*command[:-1], str(whole)], env=ENV, capture_output=True, text=True, timeout=900)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "resuming" not in kept.stderr and ": training (" not in kept.stderr  # nothing trained again
    rebuilt = json.loads((whole / "compare.json").read_text())
    assert _without_measured(rebuilt) == _without_measured(result)
    for table in (result, rebuilt):  # the flag follows that table's own quality, memory and time
        rows = [dict(row) for row in table["techniques"]]
        flag_pareto(rows, primary_metric(rows))
        assert [r["pareto"] for r in rows] == [r["pareto"] for r in table["techniques"]]


def test_a_compare_measures_the_base_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The base figures are the same for every run of a compare (one base, data and eval settings): the first run
    measures them, the others take them from the cache (issue 19: 21-103 s per run on a real model)."""
    config = _config(tiny_model_dir, tmp_path, steps=1)
    out = tmp_path / "cmp"
    env = {**ENV, "TUNELAB_CACHE": os.environ["TUNELAB_CACHE"]}  # this test's own cache (ENV was taken at import)
    done = subprocess.run(_tunelab("compare", str(config), "--techniques", "lora,prompt_tuning", "--out", str(out)),
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    logs = {path.stem: path.read_text() for path in (out / "logs").glob("*.log")}
    assert sorted(logs) == ["lora-seed42", "prompt_tuning-seed42"]
    assert "base figures from cache" not in logs["lora-seed42"]
    assert "base figures from cache (key " in logs["prompt_tuning-seed42"], logs["prompt_tuning-seed42"]
    first, second = (json.loads((out / name / "base_eval.json").read_text()) for name in sorted(logs))
    assert first == second


def test_a_run_trained_on_data_since_rewritten_is_refused_not_kept(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The same compare after the config's data file was rewritten logged 'completed earlier, kept' and reported
    the old run's figures (its data_report.json counted the old records). It is refused as `train --resume`
    refuses it: the run and the file named, and how to go on; nothing of the compare is replaced."""
    config = _config(tiny_model_dir, tmp_path, steps=1)
    out = tmp_path / "cmp"
    command = _tunelab("compare", str(config), "--techniques", "ia3", "--out", str(out))
    first = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    kept = {name: (out / name).read_bytes() for name in ("compare.json", "ia3-seed42/data_report.json")}
    write_jsonl(tmp_path / "train.jsonl", toy_chat_records(60)[20:])  # other records, the same path
    again = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)
    flat = " ".join((again.stdout + again.stderr).split())
    assert again.returncode != 0 and "completed earlier, kept" not in flat, flat
    assert "run ia3-seed42 trained on other data" in flat and str(tmp_path / "train.jsonl") in flat, flat
    assert "another --out" in flat and f"remove {out / 'ia3-seed42'}" in flat, flat
    assert {name: (out / name).read_bytes() for name in kept} == kept


def test_a_run_of_changed_data_is_refused_naming_only_the_file_that_changed(tiny_model_dir: Path,
                                                                             tmp_path: Path) -> None:
    """The refusal named every data file of the config (the run saved one hash over them all): with a train and a
    validation file and only the validation file rewritten, it names that file alone."""
    from tunelab.compare.runner import PlannedRun, _check_same_data
    from tunelab.data.prepare import data_file_hashes, fingerprint_of

    train = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(8))
    validation = write_jsonl(tmp_path / "val.jsonl", toy_chat_records(12)[8:])
    config = tiny_config(tiny_model_dir, data={"train": [str(train)], "validation": [str(validation)]})
    out, run = tmp_path / "cmp", PlannedRun("lora-seed42", "lora", 1e-4, 42)
    (out / run.name).mkdir(parents=True)
    (out / run.name / "status.json").write_text(json.dumps({"status": "completed", "step": 1}))
    hashes = data_file_hashes(config.data)
    (out / run.name / "data_report.json").write_text(json.dumps({"data_fingerprint": fingerprint_of(hashes),
                                                                 "data_file_hashes": hashes}))
    _check_same_data(config, [run], out)  # the same data: kept
    write_jsonl(validation, toy_chat_records(12)[9:])
    with pytest.raises(ConfigError, match="run lora-seed42 trained on other data") as refused:
        _check_same_data(config, [run], out)
    assert f"({validation}: content hash" in str(refused.value) and str(train) not in str(refused.value)


def test_html_report_is_self_contained_with_both_plots() -> None:
    from tunelab.compare.report import html_report

    def row(name: str, loss: float, memory: float, pareto: bool) -> dict[str, Any]:
        summary = {"mean": loss, "low": loss - 0.1, "high": loss + 0.1, "n": 2}
        return {"technique": name, "learning_rate": 2e-4, "seeds": 2, "runs": [f"{name}-seed42"],
                "metrics": {"val_loss": summary}, "higher_is_better": {"val_loss": False}, "forgetting_change": None,
                "forgetting_flagged_runs": None, "trainable_parameters": 10, "peak_memory_bytes": {"mean": memory},
                "wall_time_s": {"mean": 3.0}, "tokens_per_s": {"mean": 9.0}, "artefact_bytes": {"mean": 2**20},
                "training_tokens": {"mean": 100}, "pareto": pareto}

    result = {"primary_metric": {"name": "val_loss", "higher_is_better": False}, "warnings": ["<edge>"],
              "techniques": [row("lora", 1.0, 2**30, True), row("full", 1.2, 2**31, False)]}
    page = html_report(result, {"lora": [[(1, 2.0), (2, 1.5)], [(1, 2.1), (2, 1.4)]], "full": [[(1, 2.0), (2, 1.9)]]})
    assert page.count("<svg") == 2 and page.count("<polyline") == 3 and page.count("<circle") == 2
    assert "&lt;edge&gt;" in page and "<edge>" not in page  # text is escaped
    assert not re.search(r"(src|href)=|<script|<link|@import|url\(", page)


def test_a_default_the_config_resolved_stays_a_default_for_each_technique(tiny_model_dir: Path, tmp_path: Path) -> None:
    """data.packing left at its default is on for LoRA and turned off for prompt tuning, which cannot pack, as
    `tunelab train` does; written out by the user, it is refused for prompt tuning with the reason."""
    from tunelab.compare.runner import PlannedRun, run_config

    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(8))
    config = tiny_config(tiny_model_dir, data={"train": [str(data)]}, technique={"name": "lora", "r": 4})
    assert config.data.packing
    prompt = run_config(config, PlannedRun("p-seed1", "prompt_tuning", 0.03, 1), tmp_path / "out")
    assert prompt["data"]["packing"] is False and prompt["technique"]["name"] == "prompt_tuning"
    lora = run_config(config, PlannedRun("l-seed1", "lora", 1e-3, 1), tmp_path / "out")
    assert lora["data"]["packing"] is True and lora["technique"]["r"] == 4 and lora["training"]["seed"] == 1
    explicit = tiny_config(tiny_model_dir, data={"train": [str(data)], "packing": True})
    with pytest.raises(ConfigError, match=r"technique prompt_tuning: (.|\n)*cannot pack"):
        run_config(explicit, PlannedRun("p-seed1", "prompt_tuning", 0.03, 1), tmp_path / "out")


def test_a_technique_compare_cannot_run_is_refused_at_the_users_file_line_and_key(tiny_model_dir: Path,
                                                                                 tmp_path: Path) -> None:
    """compare refused a config one of its techniques cannot take with '<config>: (top level): data.packing: ...'.
    It now reads as `tunelab train`'s refusal of the file: the file and line (or the --set item) that gave the
    key, the key, what is expected."""
    from tunelab.compare.runner import PlannedRun, run_config
    from tunelab.config import load_config

    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(8))
    path = tmp_path / "compare.yaml"
    path.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: [{data}]\n  packing: true\n")
    prompt_tuning = PlannedRun("p-seed1", "prompt_tuning", 0.03, 1)
    with pytest.raises(ConfigError) as refused:
        run_config(load_config(path), prompt_tuning, tmp_path / "out")
    assert str(refused.value).startswith(f"technique prompt_tuning: invalid config:\n  {path}:5: data.packing: "
                                         "technique 'prompt_tuning' cannot pack examples")
    path.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: [{data}]\n")
    with pytest.raises(ConfigError) as refused:
        run_config(load_config(path, ["data.packing=true"]), prompt_tuning, tmp_path / "out")
    assert "\n  --set data.packing=true: data.packing: technique 'prompt_tuning' cannot pack" in str(refused.value)


def test_a_technique_named_by_techniques_is_refused_at_that_option(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`tunelab compare CONFIG --techniques adapter_routing` (which needs adapters the config does not give) was
    refused at the config file's technique line, which names another technique; the user named this one on the
    command line. The refusal now names --techniques (a key the file gives is still refused at its line:
    test_a_technique_compare_cannot_run_is_refused_at_the_users_file_line_and_key)."""
    from tunelab.compare.runner import PlannedRun, run_config
    from tunelab.config import load_config

    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(8))
    path = tmp_path / "compare.yaml"
    path.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: [{data}]\ntechnique:\n  name: lora\n")
    routing = PlannedRun("adapter_routing-seed1", "adapter_routing", 1e-3, 1)
    with pytest.raises(ConfigError) as refused:
        run_config(load_config(path), routing, tmp_path / "out")
    assert str(refused.value).startswith("technique adapter_routing: invalid config:\n  --techniques adapter_routing: "
                                         "technique: routing needs at least two adapters"), str(refused.value)
    assert f"{path}:" not in str(refused.value)


def test_a_preference_compare_is_judged_by_the_objectives_own_figure(tmp_path: Path) -> None:
    """compare's quality (the Pareto flag, the learning-rate choice) for DPO runs is their validation pairs'
    preference accuracy, not the exact match of their one or two generated samples (the config's eval metrics)."""
    from tunelab.compare.table import run_figures, technique_row

    rows = []
    for technique, accuracy, exact in (("lora", 0.75, 0.0), ("ia3", 0.5, 1.0)):
        run_dir = tmp_path / technique
        run_dir.mkdir()
        (run_dir / "eval.json").write_text(json.dumps({
            "base": {"loss": 0.693, "preference_accuracy": 0.25}, "tuned": {"loss": 0.6, "preference_accuracy": accuracy},
            "metrics": {"exact_match": {"base": 0.0, "tuned": exact, "higher_is_better": True}}}))
        config = {"objective": {"name": "dpo"}, "training": {}}
        figures = run_figures(run_dir, config)
        assert list(figures["metrics"])[0] == "preference_accuracy" and figures["metrics"]["exact_match"] == exact
        rows.append(technique_row(technique, 1e-4, [figures]))
    assert primary_metric(rows) == ("preference_accuracy", True)
    sft = run_figures(tmp_path / "lora", {"training": {}})  # no objective section: SFT, judged by its task metrics
    assert "preference_accuracy" not in sft["metrics"]


def test_a_metric_on_too_few_generations_does_not_judge_quality(tmp_path: Path) -> None:
    """An SFT compare with the default 4 generations: exact match (0 or 0.25 by chance) does not judge quality; the
    validation loss does, and compare says why. With 20 generations it judges."""
    from tunelab.compare.table import MIN_QUALITY_SAMPLES, quality_note, run_figures, technique_row

    def rows(generations: int) -> list[dict]:
        made = []
        for technique, loss, exact in (("lora", 1.5, 0.0), ("ia3", 1.9, 0.25)):
            run_dir = tmp_path / f"{technique}-{generations}"
            run_dir.mkdir()
            (run_dir / "eval.json").write_text(json.dumps({
                "base": {"loss": 2.0}, "tuned": {"loss": loss},
                "metrics": {"exact_match": {"base": 0.0, "tuned": exact, "higher_is_better": True,
                                            "examples": generations}}}))
            made.append(technique_row(technique, 1e-4, [run_figures(run_dir, {"training": {}})]))
        return made

    few = rows(4)
    assert primary_metric(few) == ("val_loss", False)
    assert quality_note(few, primary_metric(few)) == (
        "quality is val_loss, not exact_match (4 generations): a generation metric judges quality from 20 "
        "generations up (raise eval.num_samples)")
    enough = rows(MIN_QUALITY_SAMPLES)
    assert primary_metric(enough) == ("exact_match", True) and quality_note(enough, ("exact_match", True)) is None


def test_out_must_be_new_empty_or_an_earlier_compare(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`--out` naming a file gave a FileExistsError traceback; naming a run folder (or a folder of the user's
    files) had the compare's runs, configs and logs written into it, recorded as that folder's own (an overwrite
    of the run would then have deleted them). Both are refused, naming the folder and what it holds, and nothing
    is written there."""
    from tunelab.compare.runner import compare

    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(8))
    config = tiny_config(tiny_model_dir, data={"train": [str(data)]}, technique={"name": "lora", "r": 4})
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(ConfigError, match=r"--out .*notes.txt is a file; give a folder for the compare"):
        compare(config, ["lora"], a_file)
    assert a_file.read_text() == "mine"
    run_dir = tmp_path / "a-run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("model: {name: x}\n")
    # as an earlier compare into it left it: the compare's plan recorded as the run's own
    (run_dir / "compare_plan.json").write_text("{}")
    (run_dir / ".tunelab.json").write_text(json.dumps({"format": 2, "by": "tunelab train",
                                                       "entries": ["config.yaml", "compare_plan.json"]}))
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    for folder, what in ((run_dir, "it holds a training run"), (users, "it holds notes.txt, which tunelab compare")):
        before = sorted(p.name for p in folder.iterdir())
        with pytest.raises(ConfigError) as refused:
            compare(config, ["lora"], folder)
        assert f"--out {folder} is not empty and is not a tunelab compare folder ({what}" in str(refused.value)
        assert sorted(p.name for p in folder.iterdir()) == before  # nothing written there
    empty = tmp_path / "empty"
    empty.mkdir()
    from tunelab.compare import runner

    runner._check_out(empty)  # a new or empty folder is taken
    runner._check_out(tmp_path / "new")
    runner.claim(empty, runner.WRITER)
    (empty / "notes.txt").write_text("mine")  # an earlier compare's folder, whatever else the user put there
    runner._check_out(empty)


def test_a_terminated_compare_does_not_leave_its_run_training(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The run a compare trains is a process of its own session (a terminal's Ctrl-C reaches the compare only, which
    passes it on once). A compare ended by SIGTERM (`kill PID`, `timeout`) or SIGHUP (its terminal closed) died
    alone and left that run training, orphaned, holding its run folder's lock. The signal is passed on: the run
    ends with the compare."""
    config = _config(tiny_model_dir, tmp_path, steps=100_000)  # far longer than the test waits
    out = tmp_path / "cmp"
    metrics = out / "lora-seed42" / "metrics.jsonl"
    process = subprocess.Popen(_tunelab("compare", str(config), "--techniques", "lora", "--out", str(out)), env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count('"train"') >= 2):
        time.sleep(0.05)
    child = json.loads((out / "lora-seed42" / ".tunelab-lock").read_text())["pid"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == -signal.SIGTERM  # the compare ends as the signal ends a process
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the compare's run kept training after the compare was terminated")


def test_a_compare_with_other_settings_in_the_same_out_is_refused_naming_what_differs(tiny_model_dir: Path,
                                                                                      tmp_path: Path) -> None:
    """The refusal said only 'holds a compare with other settings': the user had to diff compare_plan.json by
    hand. It names the runs (techniques, seeds) and the config keys that differ, each value there and here."""
    from tunelab.compare.runner import PLAN, PlannedRun, _check_plan

    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(8))
    out = tmp_path / "cmp"
    out.mkdir()

    def plan(steps: int, seeds: int) -> dict[str, Any]:
        config = tiny_config(tiny_model_dir, data={"train": [str(data)]}, training={"max_steps": steps})
        return {"config": config.model_dump(mode="json"),
                "runs": [PlannedRun(f"lora-seed{42 + i}", "lora", 2e-4, 42 + i).__dict__ for i in range(seeds)]}

    _check_plan(out, plan(2, 1))
    saved = (out / PLAN).read_text()
    with pytest.raises(ConfigError) as refused:
        _check_plan(out, plan(3, 2))
    message = str(refused.value)
    assert "runs lora-seed42 there, lora-seed42, lora-seed43 here" in message, message
    assert "config training.max_steps 2 there, 3 here" in message, message
    assert (out / PLAN).read_text() == saved  # the folder's compare is left as it was


def test_the_same_runs_in_another_order_are_the_same_compare(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``--techniques ia3,lora`` after ``lora,ia3`` plans the same runs (each folder named by technique and seed):
    it resumes that compare instead of being refused as one with other settings; another technique still is."""
    from tunelab.compare.runner import PlannedRun, _check_plan

    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(8))
    out = tmp_path / "cmp"
    out.mkdir()
    config = tiny_config(tiny_model_dir, data={"train": [str(data)]}).model_dump(mode="json")

    def plan(*techniques: str) -> dict[str, Any]:
        return {"config": config, "runs": [PlannedRun(f"{t}-seed42", t, 2e-4, 42).__dict__ for t in techniques]}

    _check_plan(out, plan("lora", "ia3"))
    _check_plan(out, plan("ia3", "lora"))
    with pytest.raises(ConfigError, match="runs ia3-seed42, lora-seed42 there, ia3-seed42, adapter-seed42 here"):
        _check_plan(out, plan("ia3", "adapter"))


def test_a_failed_runs_error_is_quoted_as_written_not_as_wrapped(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The compare quotes a failed run's error from its log, where the console wrapped it at 80 columns: a long
    path came back with a space where it had been broken. The run now writes its error unwrapped, and the compare
    quotes it as written."""
    from tunelab.compare.runner import PlannedRun, _train

    missing = tmp_path / ("a-folder-name-long-enough-to-be-wrapped-" * 3) / "train.jsonl"
    out = tmp_path / "cmp"
    out.mkdir()
    config = tiny_config_dict(tiny_model_dir, data={"train": [str(missing)]}, technique={"name": "lora"},
                              output={"dir": str(out / "lora-seed42")})
    with pytest.raises(ConfigError) as failed:
        _train(PlannedRun("lora-seed42", "lora", 2e-4, 42), config, out)
    assert f"run lora-seed42 failed: {missing}: data file not found (exit code 2)" in str(failed.value), failed.value


def test_a_run_that_fails_says_why_in_the_compares_own_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A run refused at set-up (multi-task prompt tuning on records without a task) made the compare say only
    'run ... failed (exit code 2); its output is in LOG', and the refused run leaves no folder: the reason was in the
    log alone. The compare's error now carries the run's own."""
    config = _config(tiny_model_dir, tmp_path, steps=1)
    out = tmp_path / "cmp"
    failed = subprocess.run(_tunelab("compare", str(config), "--techniques", "multitask_prompt_tuning", "--out", str(out)),
                            env=ENV, capture_output=True, text=True, timeout=900)
    flat = " ".join((failed.stdout + failed.stderr).split())
    assert failed.returncode == 2, flat
    assert ("run multitask_prompt_tuning-seed42 failed: technique 'multitask_prompt_tuning' needs multi-task data: "
            "give every training record a 'task' field") in flat, flat
    assert "(exit code 2); its output is in " in flat and (out / "logs" / "multitask_prompt_tuning-seed42.log").is_file()


_FAILS_AFTER_SET_UP = """
import json, sys
from pathlib import Path
run_dir, write = Path(sys.argv[1]), sys.argv[2] == "write"
if write:  # as tunelab train records a failure after set-up, then lets the traceback through
    (run_dir / "status.json").write_text(json.dumps({"status": "failed", "step": 3, "error": "CUDA error: an\\n  illegal memory access"}))
print("Traceback (most recent call last):\\nRuntimeError: CUDA error: an", file=sys.stderr)
sys.exit(1)
"""


def test_a_run_that_fails_after_set_up_is_quoted_from_its_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that failed after set-up ends with a traceback, no 'error:' line: the compare said only 'failed (exit
    code 1)', though the run's status.json held the error. It now quotes status.json; a status.json the run did
    not write this time (an earlier session's failure) is not quoted as this run's."""
    from tunelab.compare import runner
    from tunelab.compare.runner import PlannedRun, _train

    out = tmp_path / "cmp"
    out.mkdir()
    run_dir = out / "lora-seed42"
    config = {"output": {"dir": str(run_dir)}}
    for write, expected in (("write", "failed: CUDA error: an illegal memory access (exit code 1)"),
                            ("keep", "failed (exit code 1)")):
        monkeypatch.setattr(runner, "_train_command", lambda *_, w=write: [sys.executable, "-c", _FAILS_AFTER_SET_UP,
                                                                          str(run_dir), w])
        run_dir.mkdir(exist_ok=True)
        if write == "keep":  # an earlier session's failure, left as it was by a run that did not get that far
            (run_dir / "status.json").write_text(json.dumps({"status": "failed", "step": 1, "error": "earlier"}))
            os.utime(run_dir / "status.json", ns=(1, 1))
        with pytest.raises(ConfigError) as failed:
            _train(PlannedRun("lora-seed42", "lora", 2e-4, 42), config, out)
        assert f"run lora-seed42 {expected}; its output is in " in str(failed.value), failed.value


def test_a_set_technique_item_applies_to_every_technique_compared(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`compare CONFIG --techniques lora,loha,ia3 --set technique.r=8`: the item was validated against the file's
    technique alone and silently left out of every other technique's runs. It now applies to each technique
    compared, is refused for one that has no such setting (naming the item and the technique), and a bad value
    is refused at the --set item, not at --techniques."""
    from tunelab.compare.runner import PlannedRun, run_config, split_technique_items
    from tunelab.config import load_config

    data = write_jsonl(tmp_path / "train.jsonl", toy_chat_records(8))
    path = tmp_path / "compare.yaml"
    path.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: [{data}]\ntechnique:\n  name: lora\n  r: 4\n")
    items = ["technique.r=8", "data.packing=false", "technique.name=lora"]
    config_items, technique_items = split_technique_items(items)
    assert (config_items, technique_items) == (["data.packing=false", "technique.name=lora"], ["technique.r=8"])
    config = load_config(path, config_items)
    out = tmp_path / "out"
    for technique in ("lora", "loha"):
        run = run_config(config, PlannedRun(f"{technique}-seed1", technique, 1e-3, 1), out, technique_items)
        assert run["technique"]["name"] == technique and run["technique"]["r"] == 8 and not run["data"]["packing"]
    with pytest.raises(ConfigError) as refused:
        run_config(config, PlannedRun("ia3-seed1", "ia3", 1e-3, 1), out, technique_items)
    assert str(refused.value).startswith("technique ia3: --set technique.r=8: ia3 has no setting 'r'"), refused.value
    # a setting the file's technique lacks is the compared technique's: not refused for the file's lora
    virtual = split_technique_items(["technique.num_virtual_tokens=3"])[1]
    prompt = run_config(load_config(path), PlannedRun("p-seed1", "prompt_tuning", 0.03, 1), out, virtual)
    assert prompt["technique"]["num_virtual_tokens"] == 3
    with pytest.raises(ConfigError) as refused:
        run_config(config, PlannedRun("loha-seed1", "loha", 1e-3, 1), out, ["technique.r=0"])
    assert "\n  --set technique.r=0: technique.r: " in str(refused.value), refused.value


def test_compare_refuses_a_set_technique_item_a_compared_technique_lacks(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The command line's --set technique.KEY reaches every technique compared: refused before anything trains."""
    config = _config(tiny_model_dir, tmp_path, steps=1)
    out = tmp_path / "cmp"
    refused = subprocess.run(_tunelab("compare", str(config), "--techniques", "lora,ia3", "--set", "technique.r=8",
                                      "--out", str(out)), env=ENV, capture_output=True, text=True, timeout=300)
    flat = " ".join((refused.stdout + refused.stderr).split())
    assert refused.returncode == 2 and "technique ia3: --set technique.r=8: ia3 has no setting 'r'" in flat, flat
    assert not out.exists()


def test_a_rerun_with_other_set_technique_items_is_refused(tmp_path: Path) -> None:
    """The technique items are not in the config the plan records: recorded beside it, so runs trained with
    technique.r=8 are not kept by a rerun with technique.r=16."""
    from tunelab.compare.runner import _check_plan

    out = tmp_path / "cmp"
    out.mkdir()
    plan = {"config": {"technique": {"name": "lora"}}, "runs": [{"name": "lora-seed1"}]}
    _check_plan(out, {**plan, "technique_set": ["technique.r=8"]})
    with pytest.raises(ConfigError, match=r"--set technique items \['technique.r=8'\] there, \['technique.r=16'\] here"):
        _check_plan(out, {**plan, "technique_set": ["technique.r=16"]})
