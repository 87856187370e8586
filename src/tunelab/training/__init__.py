"""Training: the batch plan (``plan``), the loop (``loop``), one run from set-up to saved result (``session``) and
the policy for starting or resuming a run in its folder (``resume``). ``train`` is the entry point."""

from tunelab.training.session import RunResult, train

__all__ = ["RunResult", "train"]
