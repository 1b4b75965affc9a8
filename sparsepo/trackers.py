"""Experiment trackers beside TensorBoard (`logging.report_to`): wandb and mlflow through their own
client APIs, behind one small interface (`log(values, step)`, `finish()`), on rank 0 only; and
`<run_dir>/metrics.jsonl`, written whatever report_to says (`JsonlSink`).

    trackers = open_trackers(["wandb"], run_dir, config=to_dict(cfg))   # [] for tensorboard alone
    for t in trackers: t.log({"train/loss": 0.69}, step=1)
    close_trackers(trackers)

Each reads its usual environment: WANDB_PROJECT (default "sparsepo"), WANDB_MODE=offline on a machine
without a network (the run is written under <run_dir>/wandb; `wandb sync` uploads it later);
MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME (default: ./mlruns, experiment "sparsepo").
(accelerate's tracker classes were the first choice; their logging needs an accelerate `PartialState`,
which would take over torch.distributed set-up inside a DeepSpeed job.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sparsepo.atomic import atomic_write

REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")
"""logging.report_to's choices ("none" alone: no tracker); TensorBoard is written by `metrics.MetricsLogger` itself."""


def flat_config(raw: dict) -> dict[str, object]:
    """The nested config dict as TensorBoard hparams: `section.key` -> bool/int/float/str."""
    flat = {}
    for section, body in raw.items():
        for key, value in (body.items() if isinstance(body, dict) else [("", body)]):
            flat[f"{section}.{key}".rstrip(".")] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


class WandbSink:
    def __init__(self, run_dir: Path, config: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sparsepo"), name=run_dir.name,
                              dir=str(run_dir), config=config)

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def finish(self) -> None:
        import wandb

        self.run.finish()
        wandb.teardown()  # waits for wandb's service to write the run: a run ends with os._exit, no atexit


class MlflowSink:
    def __init__(self, run_dir: Path, config: dict):
        import mlflow

        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "sparsepo"))
        self.mlflow, self.run = mlflow, mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params(config)

    def log(self, values: dict, step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def finish(self) -> None:
        self.mlflow.end_run()


class JsonlSink:
    """`<run_dir>/metrics.jsonl`: one JSON object per log call, `{"step": 3, "train/loss": 0.69, ...}`,
    flushed as it is written (TRL's `trainer_state.json` log history, for scripts and CI; no package
    needed). A run that starts at step 0 begins the file afresh; a resumed one first drops the lines of
    steps after its checkpoint (and a line torn by a preemption), as TensorBoard's purge does, so the
    file holds one curve."""

    NAME = "metrics.jsonl"

    def __init__(self, run_dir: str | Path, start_step: int = 0):
        path = Path(run_dir) / self.NAME
        kept = [line for line in path.read_text().splitlines() if _step_of(line) <= start_step] \
            if start_step and path.exists() else []
        atomic_write(path, "".join(line + "\n" for line in kept))
        self.file = path.open("a", encoding="utf-8")

    def log(self, values: dict, step: int) -> None:
        self.file.write(json.dumps({"step": step, **values}, default=float) + "\n")  # a 0-d tensor too
        self.file.flush()

    def finish(self) -> None:
        self.file.close()


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line that is not whole."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


SINKS = {"wandb": WandbSink, "mlflow": MlflowSink}


def open_trackers(names, run_dir: str | Path, *, config: dict | None = None) -> list:
    """The started trackers for `names` (tensorboard excluded), with the resolved config (flattened to
    `section.key`) as their hyper-parameters. A tracker whose package is missing is refused naming it."""
    trackers = []
    for name in names:
        if name in ("tensorboard", "none"):  # TensorBoard: MetricsLogger's own; none: no tracker
            continue
        try:
            __import__(name)
        except ImportError:
            raise ValueError(f"logging.report_to lists {name!r}, but the {name} package is not installed: "
                             f"pip install {name}, or leave it out of logging.report_to") from None
        trackers.append(SINKS[name](Path(run_dir), flat_config(config or {})))
    return trackers


def close_trackers(trackers: list) -> None:
    for tracker in trackers:
        tracker.finish()
