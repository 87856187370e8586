"""Evaluation: loss and perplexity, task metrics (exact match, BLEU, chrF, ROUGE, classification, user metrics),
paired bootstrap intervals, reports (eval.json, report.md, report.html, predictions.jsonl) and the forgetting
check. ``tunelab eval`` runs :func:`tunelab.eval.runner.evaluate`; the trainer uses the pieces below.
Generation itself is :mod:`tunelab.generation`."""

from tunelab.eval.loss import example_losses, loss_summary, validation_loss

__all__ = ["example_losses", "loss_summary", "validation_loss"]
