"""Weights & Biases runs for every stage: offline by default, online on request.

Each stage (and each job of a multirun) is its own W&B run; `job_type` is the stage, the
group is the experiment (`logger.group`, default: the experiment name), and the dataset /
model / optimizer / method choices are tags. The config logged is the resolved one.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tda.config import node_name, to_container


# The config groups that describe each stage's run (the evaluate stage covers every method,
# the final model is trained before any further-training optimizer matters).
STAGE_GROUPS = {"train": ("dataset", "model", "optimizer"),
                "attribute": ("dataset", "model", "optimizer", "method", "further_optimizer"),
                "evaluate": ("dataset", "model", "optimizer", "further_optimizer")}


def wandb_tags(cfg: DictConfig, stage: str) -> list[str]:
    tags = [f"stage:{stage}"]
    for group in STAGE_GROUPS.get(stage, STAGE_GROUPS["attribute"]):
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


def offline_runs(wandb_parent: str | Path) -> list[Path]:
    """Offline run directories (`<dir>/wandb/offline-run-*`) under `logger.dir`, oldest first."""
    root = Path(wandb_parent)
    root = root / "wandb" if (root / "wandb").is_dir() else root
    return sorted(root.glob("offline-run-*"), key=lambda p: p.name)


def read_offline_run(run_dir: str | Path, timeout: float = 120) -> dict[str, Any]:
    """Read back what an offline W&B run logged, through W&B's own reader of the `.wandb`
    transaction log (`wandb leet inspect --json`, shipped with wandb 0.31; no network needed).

    Returns {"run": run record (name, group, job_type, tags), "config": resolved config,
    "history": [logged rows], "summary": final summary, "metrics": define_metric records,
    "tables": {key: {"columns", "data"}} read from the run's `files/media/table`}."""
    run_dir = Path(run_dir)
    files = list(run_dir.glob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"{run_dir} holds {len(files)} run-*.wandb files; pass one offline run directory")
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(files[0])],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"`wandb leet inspect --json {files[0]}` failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out: dict[str, Any] = {"run": {}, "config": {}, "history": [], "summary": {}, "metrics": [], "tables": {}}
    for line in proc.stdout.splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        kind = rec.get("type")
        if kind == "run":
            out["run"] = {k: v for k, v in rec["run"].items() if k != "config"}
            out["config"].update(rec["run"].get("config", {}).get("update", {}))
        elif kind == "config":
            out["config"].update(rec["config"].get("update", {}))
        elif kind == "history":
            out["history"].append(rec["history"]["item"])
        elif kind == "summary":
            out["summary"].update(rec["summary"].get("update", {}))
        elif kind == "metric":
            out["metrics"].append(rec["metric"])
    out["config"].pop("_wandb", None)
    # tables: the summary points at the JSON file of each logged wandb.Table
    for key, value in out["summary"].items():
        if key.endswith(".path") and str(value).endswith(".table.json"):
            path = run_dir / "files" / str(value)
            if path.is_file():
                out["tables"][key[: -len(".path")]] = json.loads(path.read_text())
    return out


def log_gold_progress(wb: Any, gold_dir: Path) -> None:
    """After further training: per checkpoint, the size of the gold-standard attribution
    (mean over test instances of the L2 norm over left-out instances, centred and not), so
    the dashboard shows how the measured effect grows with further training and whether it
    stays far above float resolution."""
    from tda.further_training.gold_standard import load_gold_standard

    try:
        gold = load_gold_standard(Path(gold_dir), require_all=False)
    except (FileNotFoundError, ValueError) as err:
        # e.g. a job that computed only a shard of the gold standard: the run itself succeeded
        logging.getLogger(__name__).warning("not logging further-training progress to W&B: %s", err)
        return
    x_name, xs = gold.checkpoint_axis()
    wb.define_metric(x_name)
    for key in ("gold/attribution_norm_centered", "gold/attribution_norm_uncentered"):
        wb.define_metric(key, step_metric=x_name)
    centred = gold.attribution(center=True).norm(dim=-1).mean(-1)  # [T]
    raw = gold.attribution(center=False).norm(dim=-1).mean(-1)
    for t, x in enumerate(xs):
        wb.log({x_name: x, "gold/attribution_norm_centered": float(centred[t]),
                "gold/attribution_norm_uncentered": float(raw[t])})
    wb.summary.update({"gold/n_seeds": len(gold.seeds), "gold/n_checkpoints": gold.n_checkpoints})
