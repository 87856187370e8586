"""``tunelab compare``: techniques trained head to head on the same data and token budget, each seed an ordinary
run folder, summarised per technique (task metrics with 95% intervals over seeds, forgetting, trainable
parameters, peak memory, time, artefact size, a Pareto flag) in compare.json, report.md and report.html."""

from tunelab.compare.runner import CompareInterrupted, compare, split_technique_items

__all__ = ["CompareInterrupted", "compare", "split_technique_items"]
