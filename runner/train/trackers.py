"""The experiment trackers a run logs to (logger=tensorboard | wandb | csv), owned by the runner on rank 0: every
metric the runner logs goes to them on one x-axis, the optimizer step (DeepSpeed's own monitor, which logs the
learning rate against its sample count, is not used: two axes made wandb drop every metric logged "before" the
last sample count). A resumed run continues the same TensorBoard log (events after the checkpoint are purged) and
the same wandb run (its id is derived from the run directory)."""

from __future__ import annotations

import csv
import hashlib
import math
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def wandb_mode(cfg: DictConfig) -> str:
    """online / offline: the user's WANDB_MODE wins; `auto` is online when an API key is configured."""
    if os.environ.get("WANDB_MODE") and cfg.logger.mode == "auto":
        return os.environ["WANDB_MODE"]
    if cfg.logger.mode != "auto":
        return str(cfg.logger.mode)
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


def scalars(record: dict) -> dict[str, float]:
    """The finite numbers of a metrics record (a per-rank list, such as peak memory, as its maximum)."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            value = max(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


class Trackers:
    def __init__(self, cfg: DictConfig, run_dir: Path, start_step: int):
        self.name, self.tb, self.wandb, self.csv_dir = cfg.logger.name, None, None, None
        logger = cfg.logger
        if self.name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(
                log_dir=str(run_dir / "tensorboard" / str(logger.job_name)),
                purge_step=start_step + 1 if start_step else None,
            )
        elif self.name == "wandb":
            import wandb

            run_id = hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]
            self.wandb = wandb.init(
                project=logger.project,
                entity=logger.team,
                group=logger.group,
                name=run_dir.name,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                mode=wandb_mode(cfg),
                config=OmegaConf.to_container(cfg, resolve=True),
            )
        elif self.name == "csv":
            self.csv_dir = run_dir / "csv" / str(logger.job_name)
            self.csv_dir.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, record: dict) -> None:
        values = scalars(record)
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if self.csv_dir is not None:
            for key, value in values.items():
                path = self.csv_dir / (key.replace("/", "_") + ".csv")
                new = not path.exists()
                with open(path, "a", newline="") as fh:
                    writer = csv.writer(fh)
                    if new:
                        writer.writerow(["step", key])
                    writer.writerow([step, value])

    def close(self, summary: dict | None) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            if summary:
                self.wandb.summary.update(scalars(summary))
            self.wandb.finish()
