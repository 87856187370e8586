"""The before/after and forgetting policy of a training run: what the untouched model scores before the
technique is applied (``base_eval.json``), and how the weights being saved compare with it (``eval.json``).

The training session passes in how to measure its model (validation loss, greedy generations of the sample
prompts, loss on held-out text); this module decides what is measured, when saved base figures can be reused,
and what the comparison reports.

Base figures are reused from the run's own base_eval.json (a resume with the same eval settings), else from the
base-figures cache: ``<cache>/base_figures/<key>/base_eval.json``, where the key hashes everything the figures
depend on (``base_figures_cache``: the session describes the model, how it is loaded, the tokenizer and the
validation records; this module adds the eval settings, the held-out text and the library versions). Six runs of
one base on one data file (``tunelab compare``) measure the base once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tunelab import distributed, fs
from tunelab.config import EvalConfig
from tunelab.data.prepare import file_sha256
from tunelab.errors import ConfigError
from tunelab.eval.forgetting import HELDOUT_TEXT, forgetting_check, forgetting_message
from tunelab.eval.training import compare_samples
from tunelab.fs import read_json, write_entry_json
from tunelab.run_info import versions

log = logging.getLogger(__name__)

Figures = Callable[[], dict[str, float]]  # measures the model as it is now: {"loss", "perplexity", "tokens"}
Generations = Callable[[], list[str]]  # greedy outputs of the model as it is now, one per sample prompt

BASE_EVAL = "base_eval.json"
CACHE_FOLDER = "base_figures"  # under the cache root (settings: $TUNELAB_CACHE or ~/.cache/tunelab)
CACHE_WRITER = "tunelab base-figures cache"
CACHE_FORMAT = 1
NO_VALIDATION_NOTE = ("no validation data, so no before/after figures: set data.val_size above 0 or give "
                      "data.validation")


@dataclass(frozen=True)
class BaseFiguresCache:
    """One entry of the base-figures cache: ``folder`` holds base_eval.json with the ``identity`` it was measured
    for; ``key`` is the identity's hash (the folder's name)."""

    folder: Path
    key: str
    identity: dict[str, Any]


def base_figures_cache(root: Path, run_identity: dict[str, Any], eval_config: EvalConfig) -> BaseFiguresCache:
    """The cache entry for base figures measured as ``run_identity`` says (the base model's files, its dtype,
    autocast and quantization, head, tokenizer and chat template, the validation records, the objective's
    settings) with these eval settings, this held-out text and these library versions (tunelab's included)."""
    identity = {
        "format": CACHE_FORMAT, "versions": versions(), **run_identity,  # versions: tunelab, torch, transformers...
        "eval": eval_config.model_dump(mode="json"),  # batch_size too: padding can move half-precision figures
        "heldout_text": _heldout_text_hash(eval_config),
    }
    payload = json.dumps(identity, sort_keys=True, default=str)
    key = hashlib.sha256(payload.encode()).hexdigest()[:24]
    return BaseFiguresCache(root / CACHE_FOLDER / key, key, json.loads(payload))


def _heldout_text_hash(eval_config: EvalConfig) -> str | None:
    if not eval_config.forgetting:
        return None
    path = Path(eval_config.forgetting_text) if eval_config.forgetting_text else HELDOUT_TEXT
    return file_sha256(path) if path.is_file() else None  # a missing file: the forgetting check says so


def base_evaluation(run_dir: Path, eval_config: EvalConfig, has_validation: bool, validation_loss: Figures,
                    generate: Generations, heldout_loss: Figures, write: bool,
                    cache: BaseFiguresCache | None = None) -> dict[str, Any] | None:
    """Validation loss and generations of the untouched model, computed once per run (before the technique) and
    kept in base_eval.json (written when ``write``: the main process); None when nothing compares with them.
    With a ``cache`` entry (None: the figures may not be reused, e.g. a random new head), figures measured by an
    earlier run with the same identity are reused, and new ones are stored there."""
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
    wanted = (["loss", "samples"] if before_after else []) + (["forgetting"] if eval_config.forgetting else [])
    # every process takes the same branch: the measurement below is collective
    result = distributed.main_decides(lambda: _cached(cache, settings, wanted)) if cache is not None else None
    if result is None:
        result = _measure(eval_config, before_after, validation_loss, generate, heldout_loss)
        result["settings"] = settings
        if write and cache is not None:
            _store(cache, result)
    if write:
        write_entry_json(run_dir, path.name, result)
    return result


def _measure(eval_config: EvalConfig, before_after: bool, validation_loss: Figures, generate: Generations,
             heldout_loss: Figures) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if before_after:
        result = validation_loss()
        result["samples"] = generate()
    if eval_config.forgetting:
        result["forgetting"] = heldout_loss()
    return result


def _cached(cache: BaseFiguresCache, settings: dict[str, Any], wanted: list[str]) -> dict[str, Any] | None:
    """The cached figures of this identity, or None: absent, or unreadable or not what this run needs (a damaged
    entry is ignored, and the figures measured now replace it)."""
    path = cache.folder / BASE_EVAL
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
        figures = entry["figures"]
        usable = (entry["key"] == cache.key and entry["identity"] == cache.identity
                  and figures["settings"] == settings and all(name in figures for name in wanted))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("base-figures cache entry %s is damaged (%s): ignored, measuring the base again", path, exc)
        return None
    if not usable:
        log.warning("base-figures cache entry %s does not match its key: ignored, measuring the base again", path)
        return None
    log.info("base figures from cache (key %s): %s", cache.key, path)
    return figures


def _store(cache: BaseFiguresCache, figures: dict[str, Any]) -> None:
    """Write the entry as a folder tunelab owns whole, put in place only once complete; one that tunelab did not
    write is left alone, and these figures are simply not cached."""
    try:
        with fs.owned_folder(cache.folder, CACHE_WRITER) as tmp:
            fs.write_json(tmp / BASE_EVAL, {"key": cache.key, "identity": cache.identity, "figures": figures})
    except (ConfigError, OSError) as exc:
        log.warning("base figures not cached: %s", exc)
        return
    log.info("base figures cached (key %s): %s", cache.key, cache.folder)


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
    ``generate`` is None on processes other than the main one (they report no samples and no metrics), except in a
    sharded run, where every process generates (each forward is a collective) and only the main's report is kept."""
    if tuned is None:  # eval.json is still written: it says why it holds no figures
        return {"tuned": None, "note": NO_VALIDATION_NOTE}
    comparison: dict[str, Any] = {"tuned": tuned}
    if base is None or "loss" not in base:
        return comparison
    outputs = generate() if generate is not None else []
    comparison["base"] = {k: v for k, v in base.items() if k not in ("samples", "forgetting", "settings")}
    comparison["loss_change"] = round(tuned["loss"] - base["loss"], 6)
    # over |base|: a loss may be negative (an online objective's: minus its reward); a fall is a negative change
    comparison["relative_loss_change"] = round((tuned["loss"] - base["loss"]) / abs(base["loss"]), 4) if base["loss"] else None
    comparison["samples"] = [{**s, "base": b, "tuned": t} for s, b, t in zip(samples, base["samples"], outputs)]
    if generate is not None and eval_config.metrics:  # task metrics of the samples, with paired bootstrap intervals
        comparison["metrics"] = compare_samples(eval_config.metrics, base["samples"], outputs,
                                                [s["reference"] for s in samples], seed=seed)
    return comparison
