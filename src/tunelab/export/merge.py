"""``tunelab merge RUN [--out DIR]``: fold a run's adapter into the base weights and check the merge.

The merged folder is a standalone transformers model (safetensors + tokenizer) that plain
``AutoModelForCausalLM.from_pretrained`` loads. The merge check runs the adapter model (as ``load_run`` opens it)
and the merged model on a few validation batches and reports, over every real token position,
    max_logit_diff = max |z_adapter - z_merged|
    mean_kl        = mean_t KL( softmax(z_adapter,t) || softmax(z_merged,t) )
For exact merges both are at float rounding level (~1e-5 in float32). Techniques whose result is not a weight
change (the prompt family) and full/freeze results (already standalone) are refused with the reason.

A run whose objective trains on records of its own (pairs, labeled texts, prompts: its ``collate`` is not the SFT
one) is checked on that objective's batches, as its ``collate`` makes them: the head's outputs are compared where
the objective reads them (each real token of a language-model head; each row of a score or class head, for which
the KL is over the classes, 0 for a one-score head), and, when its loss reads those batches (every objective but
the online ones, whose loss reads sampled completions), its loss and logged figures per unit, of both models
against one reference (the adapter model with its adapter off, the base a live reference is), as
``figures`` {adapter, merged} and their largest difference ``max_figure_diff``.
"""

from __future__ import annotations

import json
import logging
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from tunelab import fs
from tunelab.data import collate, prepare_data
from tunelab.data.tokenize import TokenizedExample, pad_token_id
from tunelab.errors import ConfigError, DataError, TechniqueError
from tunelab.models import cache_root
from tunelab.objectives import OBJECTIVES, Objective, Reference, prepare_objective_data
from tunelab.result import find_result, load_run
from tunelab.techniques.base import forward_inputs

log = logging.getLogger(__name__)

MERGED_DIR = "merged"  # the default output, inside the run folder
WRITER = "tunelab merge"  # the ownership record of a folder this command wrote, so a second merge may replace it
CHECK_FILE = "merge_check.json"
FALLBACK_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Question: what is the capital of France? Answer: Paris.",
    "Fine-tuning adapts a pretrained language model to a task.",
]


@dataclass
class MergeCheck:
    max_logit_diff: float
    mean_kl: float
    tokens: int
    batches: int
    source: str  # which examples were used
    note: str  # what was merged into what (QLoRA: into the dequantized base)
    # A run of an objective with records of its own (see the module docstring); None for SFT records, and then
    # left out of merge_check.json, which stays as it always was
    objective: str | None = None
    figures: dict[str, dict[str, float]] | None = None  # {"adapter": {loss, stats...}, "merged": {...}} per unit
    max_figure_diff: float | None = None
    figures_note: str | None = None  # why training's validation figures of the same records differ, where they do


@dataclass
class MergeOutcome:
    out_dir: Path
    check: MergeCheck


def merge_run(run: str | Path, out: str | Path | None = None, device: str | torch.device | None = None,
              batches: int = 4, batch_size: int = 4) -> MergeOutcome:
    """Merge the run's result into a standalone model in ``out`` (default ``RUN/merged``) and check it."""
    found = find_result(run)  # what the folder holds, before any weights are loaded
    technique = found.technique
    reason = technique.refusal("merge")
    if reason is not None:
        raise TechniqueError(f"{run}: technique '{technique.name}' cannot be merged: {reason}")
    if found.run_dir is None:
        raise ConfigError(f"{run}: an adapter folder on its own; merge takes its run folder, whose config says how "
                          "the base was loaded for training (the merge folds the adapter into that base)")
    run_dir = found.run_dir
    loaded = load_run(found, device=device)
    out_dir = Path(out) if out is not None else run_dir / MERGED_DIR
    in_run = out_dir.resolve().parent == run_dir.resolve()  # an entry of the run folder: its ownership record rules
    if in_run:
        fs.own_entry(run_dir, out_dir.name)  # refuses a same-named entry of the user's before any work
    else:
        fs.check_replaceable(out_dir)  # before the merge's work; a folder of the user's is refused
    device = next(loaded.model.parameters()).device
    merged = technique.merge(loaded.config, loaded.result_dir, device)
    merged.model.eval()
    check = _check(loaded, merged.model, merged.note, batches, batch_size)
    if check.figures is not None:
        check.figures_note = figures_note(run_dir, next(merged.model.parameters()).dtype)
    if in_run:
        with fs.new_entry_folder(run_dir, out_dir.name) as tmp:
            _fill(tmp, merged.model, loaded.tokenizer, check)
    else:  # a folder of its own, replaced only as a whole and only when every entry in it is tunelab's
        with fs.owned_folder(out_dir, WRITER) as tmp:
            _fill(tmp, merged.model, loaded.tokenizer, check)
    return MergeOutcome(out_dir, check)


def _fill(folder: Path, model: torch.nn.Module, tokenizer: Any, check: MergeCheck) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    figures = {key: value for key, value in asdict(check).items() if value is not None}  # SFT's: as it always was
    (folder / CHECK_FILE).write_text(json.dumps(figures, indent=2) + "\n")


def figures_note(run_dir: Path, dtype: torch.dtype) -> str | None:
    """Why the check's figures are not training's final validation figures of the same records, or None when they
    are computed alike: training ran under autocast or with its frozen weights in another dtype (run_info.json's
    precision; ``model.dtype: auto`` on a CPU with native bfloat16), the check in ``dtype``. A DPO run's loss
    (0.6736 in training, 0.6378 here, 4 pairs) differs by that rounding of its log-probabilities: the same loss,
    reference, beta and averaging, in float32."""
    try:
        precision = (fs.read_json(run_dir / "run_info.json") or {}).get("precision")
    except (OSError, ValueError, AttributeError):  # no readable record: nothing to say
        return None
    checked = str(dtype).removeprefix("torch.")
    if not isinstance(precision, dict) or (precision.get("autocast") in (None, "no")
                                           and precision.get("dtype") in (None, checked)):
        return None
    autocast = precision.get("autocast")
    trained = f"{precision.get('dtype')} weights" + (f", {autocast} autocast" if autocast not in (None, "no") else "")
    return (f"computed in {checked}; training's validation figures ({trained}) differ from these by that rounding, "
            "not by the merge")


def _check(loaded: Any, merged_model: torch.nn.Module, note: str, batches: int, batch_size: int) -> MergeCheck:
    """The merge check on the records the run's objective trains on: SFT records as they always were, any other
    objective's records as its own ``collate`` batches them (falling back to the fixed texts as SFT records when
    the run's data cannot be read)."""
    objective = OBJECTIVES[loaded.config.objective.name]
    if objective.collate is collate:  # SFT records
        return compare(loaded.model, merged_model, *_check_batches(loaded, batches, batch_size), note=note)
    own = _objective_batches(loaded, objective, batches, batch_size)  # pairs, labeled texts, prompts
    if own is not None:
        return compare_objective(loaded, objective, merged_model, *own, note=note)
    # its records cannot be read: the head's outputs on the fixed texts (a score head has no token logits)
    return compare_objective(loaded, None, merged_model, [_fixed_batch(loaded.tokenizer)], "fixed texts", note=note)


def _check_batches(loaded: Any, batches: int, batch_size: int) -> tuple[list[dict[str, torch.Tensor]], str]:
    """Up to ``batches`` batches of the run's validation examples (else its first training examples, else a few
    fixed texts when the run's data files are gone)."""
    try:
        data = prepare_data(loaded.config.data, loaded.tokenizer, cache_root() / "data")
        examples, source = (data.validation, "validation examples") if data.validation else (data.train, "training examples")
    except (DataError, OSError) as exc:
        log.warning("merge check: the run's data cannot be read (%s); using fixed texts", exc)
        examples, source = [], "fixed texts"
    if not examples:
        examples, source = _fixed_examples(loaded.tokenizer), "fixed texts"
    examples = examples[: batches * batch_size]
    pad = pad_token_id(loaded.tokenizer)
    rows = [[e] for e in examples]
    return [collate(rows[i : i + batch_size], pad) for i in range(0, len(rows), batch_size)], source


def _fixed_examples(tokenizer: Any) -> list[TokenizedExample]:
    return [TokenizedExample(ids, ids, "fixed") for ids in tokenizer(FALLBACK_TEXTS)["input_ids"]]


def _fixed_batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    return collate([[e] for e in _fixed_examples(tokenizer)], pad_token_id(tokenizer))


def _objective_batches(loaded: Any, objective: Objective, batches: int,
                       batch_size: int) -> tuple[list[dict[str, torch.Tensor]], str] | None:
    """Up to ``batches`` batches of the run's validation records (else its first training records) as the
    objective collates them; None when the run's data cannot be read."""
    try:
        data = prepare_objective_data(loaded.config.objective, loaded.config.data, loaded.tokenizer, cache_root() / "data")
    except (DataError, ConfigError, OSError) as exc:
        log.warning("merge check: the run's data cannot be read (%s); using fixed texts", exc)
        return None
    records, source = (data.validation, "validation records") if data.validation else (data.train, "training records")
    if not records:
        return None
    rows = [[record] for record in records[: batches * batch_size]]
    pad = pad_token_id(loaded.tokenizer)
    return [objective.collate(rows[i : i + batch_size], pad) for i in range(0, len(rows), batch_size)], source


@torch.no_grad()
def compare_objective(loaded: Any, objective: Objective | None, merged_model: torch.nn.Module,
                      batches: list[dict[str, torch.Tensor]], source: str, note: str) -> MergeCheck:
    """The head's outputs (``_head_outputs``) and, when ``objective``'s loss reads these batches, its loss and
    figures per unit, of the adapter model and the merged model."""
    device = next(merged_model.parameters()).device
    batches = [{key: value.to(device) for key, value in batch.items()} for batch in batches]
    max_diff, kl_sum, units = 0.0, 0.0, 0
    for batch in batches:
        ours, theirs = _head_outputs(loaded.model, batch), _head_outputs(merged_model, batch)  # (N, C) each
        max_diff = max(max_diff, float((ours - theirs).abs().max()))
        kl = F.kl_div(F.log_softmax(theirs.double(), -1), F.log_softmax(ours.double(), -1), log_target=True,
                      reduction="none")  # KL(adapter || merged), float64 as in compare
        kl_sum, units = kl_sum + float(kl.sum()), units + ours.shape[0]
    check = MergeCheck(max_diff, kl_sum / max(units, 1), units, len(batches), source, note)
    if objective is None or objective.prepare is not None:  # an online loss reads sampled completions, not these
        return check
    figures = {name: _figures(objective, loaded, model, batches)
               for name, model in (("adapter", loaded.model), ("merged", merged_model))}
    check.objective, check.figures = objective.name, figures
    check.max_figure_diff = max(abs(figures["adapter"][key] - figures["merged"][key]) for key in figures["adapter"])
    return check


def _head_outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, C) float32 outputs where the objective reads them: a language-model head's (R, T, V) logits at each real
    token (a prompt technique's virtual tokens dropped), a score or class head's (R, k) outputs, one per row."""
    ids, positions = batch["input_ids"], batch["position_ids"]
    logits = model(input_ids=ids, position_ids=positions, use_cache=False, **forward_inputs(model, batch)).logits
    if logits.dim() == 2:  # pooled by the model at each row's last real token
        return logits.float()
    return logits[:, -ids.shape[1]:].float()[_real_positions(positions)]


def _figures(objective: Objective, loaded: Any, model: torch.nn.Module,
             batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """The objective's loss and logged figures per unit over ``batches``, scored against the adapter model with its
    adapter off: one reference for both models, so any difference between their figures is the merge's."""
    spec = objective.bind(loaded.config.objective, _fixed_reference(loaded.model, loaded.technique.disabled_view))
    sums: dict[str, float] = {}
    units = 0
    for batch in batches:
        loss = spec.loss_sum(model, batch)
        units += loss.num_units
        for key, value in {"loss": loss.loss_sum, **loss.stats}.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    return {key: value / max(units, 1) for key, value in sums.items()}


def _fixed_reference(scorer: torch.nn.Module,
                     disabled_view: Callable[[torch.nn.Module], AbstractContextManager[Any]] | None) -> Reference:
    """A reference that is ``scorer`` (with its adapter off when the technique has that view) whichever model is
    scored: the merged model has no adapter to switch off, and both models must be compared against one reference."""
    @contextmanager
    def reference(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        with torch.no_grad(), (disabled_view(scorer) if disabled_view is not None else nullcontext()):
            yield scorer
    return reference


@torch.no_grad()
def compare(adapter_model: torch.nn.Module, merged_model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
            source: str, note: str) -> MergeCheck:
    """Largest logit difference and mean KL(adapter || merged) over the real (non-padding) token positions."""
    device = next(merged_model.parameters()).device
    max_diff, kl_sum, tokens = 0.0, 0.0, 0
    for batch in batches:
        ids, positions = batch["input_ids"].to(device), batch["position_ids"].to(device)
        real = _real_positions(positions)  # (B, T): False on right padding
        a = adapter_model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, -ids.shape[1]:].float()  # (B, T, V)
        m = merged_model(input_ids=ids, position_ids=positions, use_cache=False).logits.float()  # (B, T, V)
        a, m = a[real], m[real]  # (N, V)
        max_diff = max(max_diff, float((a - m).abs().max()))
        # float64: for an exact merge the KL is ~1e-12, below float32 rounding of the log-probabilities
        kl = F.kl_div(F.log_softmax(m.double(), -1), F.log_softmax(a.double(), -1), log_target=True, reduction="none").sum(-1)  # (N,)
        kl_sum += float(kl.sum())
        tokens += int(real.sum())
    return MergeCheck(max_diff, kl_sum / max(tokens, 1), tokens, len(batches), source, note)


def _real_positions(positions: torch.Tensor) -> torch.Tensor:
    """Rows hold one example then padding, whose positions restart at 0: real tokens come before that restart."""
    restart = torch.zeros_like(positions, dtype=torch.bool)
    restart[:, 1:] = positions[:, 1:] == 0
    return restart.cumsum(1) == 0
