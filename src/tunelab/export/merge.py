"""``tunelab merge RUN [--out DIR]``: fold a run's adapter into the base weights and check the merge.

The merged folder is a standalone transformers model (safetensors + tokenizer) that plain
``AutoModelForCausalLM.from_pretrained`` loads. The merge check runs the adapter model (as ``load_run`` opens it)
and the merged model on a few validation batches and reports, over every real token position,
    max_logit_diff = max |z_adapter - z_merged|
    mean_kl        = mean_t KL( softmax(z_adapter,t) || softmax(z_merged,t) )
For exact merges both are at float rounding level (~1e-5 in float32). Techniques whose result is not a weight
change (the prompt family) and full/freeze results (already standalone) are refused with the reason.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tunelab import fs
from tunelab.data import collate, prepare_data
from tunelab.data.tokenize import TokenizedExample, pad_token_id
from tunelab.errors import DataError, TechniqueError
from tunelab.models import cache_root
from tunelab.result import find_result, load_run

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
    check = compare(loaded.model, merged.model, *_check_batches(loaded, batches, batch_size), note=merged.note)
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
    (folder / CHECK_FILE).write_text(json.dumps(asdict(check), indent=2) + "\n")


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
        examples, source = [TokenizedExample(ids, ids, "fixed") for ids in loaded.tokenizer(FALLBACK_TEXTS)["input_ids"]], "fixed texts"
    examples = examples[: batches * batch_size]
    pad = pad_token_id(loaded.tokenizer)
    rows = [[e] for e in examples]
    return [collate(rows[i : i + batch_size], pad) for i in range(0, len(rows), batch_size)], source


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
