"""logging.report_to: wandb, offline (WANDB_MODE=offline, no network), receives the same scalars as
TensorBoard under the same names, and the resolved config; a tracker that is not installed, or an
unknown name, is refused naming it."""

import glob
import json
import struct

import pytest

from sparsepo.config import ConfigError, load_config
from sparsepo.metrics import MetricsLogger


def wandb_records(run_dir):
    """The protobuf records of an offline wandb run file (LevelDB log format: 32 KiB blocks of
    crc32 + length + type framed chunks, after W&B's 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, pos, buf, block = open(path, "rb").read(), 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if n == 0 and kind == 0:
            break
        buf, pos = buf + data[pos:pos + n], pos + n
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def test_wandb_offline_gets_the_scalars_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    m = MetricsLogger(tmp_path / "run", total_steps=2, enabled=True, progress=False,
                      config={"method": {"name": "dpo", "beta": 0.25}}, report_to=("tensorboard", "wandb"))
    m.log(1, {"loss": 0.75, "rewards/chosen": 0.125})
    m.log(2, {"loss": 0.5, "rewards/chosen": 0.25})
    m.log(2, {"loss": 0.625}, prefix="eval")
    m.close()
    history, config = {}, {}
    for r in wandb_records(tmp_path / "run"):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history[items["_step"]] = {k: v for k, v in items.items() if not k.startswith("_")}
        if kind in ("run", "config"):
            updates = r.run.config.update if kind == "run" else r.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
    assert history == {1: {"train/loss": 0.75, "train/rewards/chosen": 0.125},
                       2: {"train/loss": 0.5, "train/rewards/chosen": 0.25, "eval/loss": 0.625}}
    beta = config["method.beta"]
    assert (beta["value"] if isinstance(beta, dict) else beta) == 0.25
    assert (tmp_path / "run" / "tensorboard").is_dir()


def test_report_to_refuses_unknown_names_and_missing_packages(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"logging.report_to .* lists \['wandbb'\]; choose from tensorboard, "
                                          r"wandb, mlflow"):
        load_config(None, ["logging.report_to=[tensorboard, wandbb]"])
    assert load_config(None, ["logging.report_to=wandb"]).logging.report_to == ["wandb"]
    assert load_config(None, ["logging.report_to=none"]).logging.report_to == ["none"]  # TRL's spelling
    with pytest.raises(ConfigError, match=r"'none' \(no tracker; metrics.jsonl is still written\) goes alone"):
        load_config(None, ["logging.report_to=[none, wandb]"])
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)  # not installed
    with pytest.raises(ValueError, match="lists 'mlflow', but the mlflow package is not installed"):
        MetricsLogger(tmp_path, total_steps=1, enabled=True, progress=False, report_to=("mlflow",))


def jsonl(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl_holds_every_logged_scalar_without_any_tracker(tmp_path):
    m = MetricsLogger(tmp_path, total_steps=2, enabled=True, progress=False, report_to=())
    m.log(1, {"loss": 0.75, "rewards/chosen": 0.125})
    m.log(2, {"loss": 0.5})
    m.log(2, {"loss": 0.625}, prefix="eval")
    m.close()
    assert jsonl(tmp_path) == [{"step": 1, "train/loss": 0.75, "train/rewards/chosen": 0.125},
                               {"step": 2, "train/loss": 0.5}, {"step": 2, "eval/loss": 0.625}]
    assert not (tmp_path / "tensorboard").exists()


def test_metrics_jsonl_of_a_resumed_run_drops_the_steps_after_its_checkpoint(tmp_path):
    first = MetricsLogger(tmp_path, total_steps=6, enabled=True, progress=False, report_to=())
    for step in range(1, 6):
        first.log(step, {"loss": float(step)})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # a line torn by a preemption
    resumed = MetricsLogger(tmp_path, total_steps=6, start_step=3, enabled=True, progress=False, report_to=())
    resumed.log(4, {"loss": 40.0})
    resumed.close()
    assert jsonl(tmp_path) == [{"step": s, "train/loss": float(s)} for s in (1, 2, 3)] + [{"step": 4, "train/loss": 40.0}]
    fresh = MetricsLogger(tmp_path, total_steps=6, enabled=True, progress=False, report_to=())  # start 0: a new run
    fresh.close()
    assert jsonl(tmp_path) == []


def test_report_to_none_writes_metrics_jsonl_alone(tmp_path):
    m = MetricsLogger(tmp_path, total_steps=1, enabled=True, progress=False, report_to=("none",))
    m.log(1, {"loss": 0.5})
    m.close()
    assert jsonl(tmp_path) == [{"step": 1, "train/loss": 0.5}] and not (tmp_path / "tensorboard").exists()


def test_only_the_main_rank_writes_metrics_jsonl(tmp_path):
    MetricsLogger(tmp_path, total_steps=1, enabled=False, progress=False).log(1, {"loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()


def test_metrics_jsonl_takes_the_scalar_types_tensorboard_takes(tmp_path):
    import numpy as np
    import torch

    m = MetricsLogger(tmp_path, total_steps=1, enabled=True, progress=False, report_to=())
    m.log(1, {"loss": torch.tensor(0.5), "grad_norm": np.float32(0.25), "steps": 3})
    m.close()
    assert jsonl(tmp_path) == [{"step": 1, "train/loss": 0.5, "train/grad_norm": 0.25, "train/steps": 3}]
