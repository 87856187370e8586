"""``training.report_to``: metrics also go where users already look. All work offline, inside the run folder:
TensorBoard event files in ``tensorboard/`` (``tensorboard --logdir RUN/tensorboard``), a local MLflow store in
``mlruns/`` (``mlflow ui --backend-store-uri RUN/mlruns``) and an offline Weights & Biases run in ``wandb/``
(``wandb sync RUN/wandb/offline-run-*`` uploads it later, if the user wants). metrics.jsonl stays the source of
truth."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError
from tunelab.fs import own_entry  # recorded in the run's ownership record before it is written

INSTALL_HINT = "install it with: pip install 'tunelab[tracking]'"


class Trackers:
    """Fan out each metrics record to the requested trackers (main process only)."""

    def __init__(self, names: list[str], run_dir: Path, config: dict[str, Any], resume: bool) -> None:
        self._tensorboard = self._mlflow = self._wandb = None
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(f"training.report_to: tensorboard needs the tensorboard package; {INSTALL_HINT}") from None
            self._tensorboard = SummaryWriter(log_dir=str(own_entry(run_dir, "tensorboard")))
        if "mlflow" in names:
            try:
                import mlflow
            except ImportError:
                raise ConfigError(f"training.report_to: mlflow needs the mlflow package; {INSTALL_HINT}") from None
            # A plain folder store: it needs no database package and opens with `mlflow ui`. MLflow 3 keeps it in
            # maintenance mode behind this documented opt-in (a database store would need SQLAlchemy and Alembic).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self._mlflow = mlflow.tracking.MlflowClient(tracking_uri=own_entry(run_dir, "mlruns").resolve().as_uri())
            self._mlflow_run = self._start_mlflow_run(run_dir, config, resume)
        if "wandb" in names:
            self._wandb = _start_wandb_run(run_dir, config, resume)

    def _start_mlflow_run(self, run_dir: Path, config: dict[str, Any], resume: bool) -> str:
        client = self._mlflow
        experiment = client.get_experiment_by_name("tunelab")
        experiment_id = experiment.experiment_id if experiment else client.create_experiment("tunelab")
        if resume:  # continue the run's own MLflow run rather than starting a second one
            found = client.search_runs([experiment_id], max_results=1, order_by=["attributes.start_time DESC"])
            if found:
                return found[0].info.run_id
        run = client.create_run(experiment_id, run_name=run_dir.name)
        for key, value in _flatten(config).items():
            client.log_param(run.info.run_id, key, str(value)[:500])  # MLflow caps a parameter's length
        return run.info.run_id

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        prefix = record.get("kind", "train")
        values = {f"{prefix}/{k}": float(v) for k, v in record.items()
                  if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._mlflow is not None:
            for key, value in values.items():
                self._mlflow.log_metric(self._mlflow_run, key.replace("/", "."), value, step=step)
        if self._wandb is not None and values:
            self._wandb.log(values, step=step)

    def close(self, status: str = "FINISHED") -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._mlflow is not None:
            self._mlflow.set_terminated(self._mlflow_run, status=status)
            self._mlflow = None
        if self._wandb is not None:
            self._wandb.finish(exit_code=0 if status == "FINISHED" else 1)
            self._wandb = None


def _start_wandb_run(run_dir: Path, config: dict[str, Any], resume: bool) -> Any:
    """An offline W&B run in RUN/wandb (nothing leaves the machine, whatever the user's W&B settings say). A resume
    continues the run's own W&B run id, so that a later ``wandb sync`` shows one run."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(f"training.report_to: wandb needs the wandb package; {INSTALL_HINT}") from None
    folder = own_entry(run_dir, "wandb")  # wandb.init(dir=RUN) writes RUN/wandb/offline-run-<time>-<id>/
    earlier = sorted(folder.glob("offline-run-*")) if resume and folder.is_dir() else []
    run_id = re.sub(r"^offline-run-\d+_\d+-", "", earlier[-1].name) if earlier else None
    # console off: W&B would otherwise wrap stdout and stderr, which tunelab's progress display owns
    settings = wandb.Settings(console="off", silent=True, disable_git=True, save_code=False)
    return wandb.init(mode="offline", dir=str(run_dir), project="tunelab", name=run_dir.name, config=config,
                      id=run_id, resume="allow" if run_id else None, settings=settings)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
