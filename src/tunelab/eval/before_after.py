"""The before/after and forgetting policy of a training run: what the untouched model scores before the
technique is applied (``base_eval.json``), and how the weights being saved compare with it (``eval.json``).

The training session passes in how to measure its model (validation loss, greedy generations of the sample
prompts, loss on held-out text); this module decides what is measured, when saved base figures can be reused,
and what the comparison reports.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from tunelab.config import EvalConfig
from tunelab.eval.forgetting import forgetting_check, forgetting_message
from tunelab.eval.training import compare_samples
from tunelab.fs import read_json, write_entry_json

log = logging.getLogger(__name__)

Figures = Callable[[], dict[str, float]]  # measures the model as it is now: {"loss", "perplexity", "tokens"}
Generations = Callable[[], list[str]]  # greedy outputs of the model as it is now, one per sample prompt

BASE_EVAL = "base_eval.json"
NO_VALIDATION_NOTE = ("no validation data, so no before/after figures: set data.val_size above 0 or give "
                      "data.validation")


def base_evaluation(run_dir: Path, eval_config: EvalConfig, has_validation: bool, validation_loss: Figures,
                    generate: Generations, heldout_loss: Figures, write: bool) -> dict[str, Any] | None:
    """Validation loss and generations of the untouched model, computed once per run (before the technique) and
    kept in base_eval.json (written when ``write``: the main process); None when nothing compares with them."""
    path = run_dir / BASE_EVAL
    before_after = eval_config.before_after and has_validation
    if not before_after and not eval_config.forgetting:
        return None
    # The settings the figures depend on: a resume with other eval.* settings must not compare base figures from
    # one validation subset with tuned figures from another. (The data cannot change on resume: fingerprinted.)
    settings = eval_config.model_dump(mode="json", exclude={"batch_size"})
    saved = read_json(path) if path.is_file() else None
    if saved is not None and saved.get("settings") == settings:
        return saved
    if saved is not None:
        log.info("eval settings changed since base_eval.json was computed: computing the base figures again")
    result: dict[str, Any] = {}
    if before_after:
        result = validation_loss()
        result["samples"] = generate()
    if eval_config.forgetting:
        result["forgetting"] = heldout_loss()
    result["settings"] = settings
    if write:
        write_entry_json(run_dir, path.name, result)
    return result


def forgetting_after(eval_config: EvalConfig, base: dict[str, Any] | None, heldout_loss: Figures) -> dict[str, Any] | None:
    """The forgetting check on the weights being saved, against the base figure measured before training."""
    if not eval_config.forgetting:
        return None
    if not base or "forgetting" not in base:  # e.g. switched on at --resume, after the base was measured
        return {"note": "no held-out loss of the base model was measured for this run, so no forgetting check"}
    check = forgetting_check(base["forgetting"], heldout_loss(), eval_config.forgetting_threshold,
                             eval_config.forgetting_text)
    if check["flagged"]:
        log.warning(forgetting_message(check))
    return check


def compare_with_base(eval_config: EvalConfig, base: dict[str, Any] | None, tuned: dict[str, Any] | None,
                      samples: list[dict[str, str]], generate: Generations | None, seed: int) -> dict[str, Any]:
    """eval.json's comparison: the tuned figures, the base ones, the loss change, the sample generations side by
    side and their task metrics with paired bootstrap intervals. ``tuned`` is None without validation data;
    ``generate`` is None on processes other than the main one (they report no samples and no metrics)."""
    if tuned is None:  # eval.json is still written: it says why it holds no figures
        return {"tuned": None, "note": NO_VALIDATION_NOTE}
    comparison: dict[str, Any] = {"tuned": tuned}
    if base is None or "loss" not in base:
        return comparison
    outputs = generate() if generate is not None else []
    comparison["base"] = {k: v for k, v in base.items() if k not in ("samples", "forgetting", "settings")}
    comparison["loss_change"] = round(tuned["loss"] - base["loss"], 6)
    comparison["relative_loss_change"] = round((tuned["loss"] - base["loss"]) / base["loss"], 4) if base["loss"] else None
    comparison["samples"] = [{**s, "base": b, "tuned": t} for s, b, t in zip(samples, base["samples"], outputs)]
    if generate is not None and eval_config.metrics:  # task metrics of the samples, with paired bootstrap intervals
        comparison["metrics"] = compare_samples(eval_config.metrics, base["samples"], outputs,
                                                [s["reference"] for s in samples], seed=seed)
    return comparison
