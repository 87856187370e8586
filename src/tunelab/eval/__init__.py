"""Evaluation: loss and perplexity, task metrics (exact match, BLEU, chrF, ROUGE, classification, user metrics),
paired bootstrap intervals, reports (eval.json, report.md, report.html, predictions.jsonl) and the forgetting
check. ``tunelab eval`` runs :func:`tunelab.eval.runner.evaluate`; the trainer uses the pieces below."""

from tunelab.eval.generation import generate, generate_batch, generate_samples, sample_prompts, stop_token_ids
from tunelab.eval.loss import example_losses, loss_summary, validation_loss

__all__ = ["example_losses", "generate", "generate_batch", "generate_samples", "loss_summary", "sample_prompts",
           "stop_token_ids", "validation_loss"]
