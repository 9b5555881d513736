"""Weights & Biases runs for every stage: offline by default, online on request.

Each stage (and each job of a multirun) is its own W&B run; `job_type` is the stage, the
group is the experiment (`logger.group`, default: the experiment name), and the dataset /
model / optimizer / method choices are tags. The config logged is the resolved one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tda.config import node_name, to_container


def wandb_tags(cfg: DictConfig, stage: str) -> list[str]:
    tags = [f"stage:{stage}"]
    for group in ("dataset", "model", "optimizer", "method", "further_optimizer"):
        if group in cfg and cfg[group] is not None:
            tags.append(f"{group}:{node_name(cfg[group])}")
    tags += list(cfg.logger.get("tags") or [])
    return tags


def init_wandb(cfg: DictConfig, stage: str, name: str):
    """A W&B run for this stage, or None when `logger=none`."""
    lg = cfg.get("logger")
    if lg is None or lg.get("mode", "disabled") == "disabled":
        return None
    import wandb

    mode = os.environ.get("WANDB_MODE") or lg.mode
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _has_netrc_key()):
        raise RuntimeError("logger.mode=online needs a W&B account: run `wandb login` or set WANDB_API_KEY, "
                           "or keep the default logger.mode=offline and `wandb sync` later")
    wandb_dir = Path(lg.dir).expanduser().resolve()
    wandb_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=lg.project, entity=lg.get("entity"), group=lg.get("group") or cfg.get("name"),
                      job_type=stage, name=name, tags=wandb_tags(cfg, stage), mode=mode, dir=str(wandb_dir),
                      config=to_container(cfg), reinit="create_new",
                      settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))


def _has_netrc_key() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text()


def finish(run: Any) -> None:
    if run is not None:
        run.finish()
