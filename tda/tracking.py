"""Weights & Biases runs for every stage: offline by default, online on request.

Each stage (and each job of a multirun) is its own W&B run; `job_type` is the stage, the
group is the experiment (`logger.group`, default: the experiment name, `<dataset>-<model>`
unless an experiment config names it), and the dataset / model / optimizer / method choices
are tags. The config logged is the resolved one. A stage that fails or is interrupted finishes
its run as failed; a job whose work was already done is tagged `cached` and logs no timings.
All of W&B's files stay under `logger.dir` (default `paths.runs_dir`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tda.config import node_name, to_container
from tda.exits import USER_ERROR_EXIT, UserError, exit_code_of, unwritable_directory

# The config groups that describe each stage's run (the evaluate stage covers every method,
# the final model is trained before any further-training optimizer matters, the gold standard
# has no method).
STAGE_GROUPS = {"train": ("dataset", "model", "optimizer"),
                "attribute": ("dataset", "model", "optimizer", "method", "further_optimizer"),
                "further_train": ("dataset", "model", "optimizer", "further_optimizer"),
                "evaluate": ("dataset", "model", "optimizer", "further_optimizer")}


def wandb_tags(cfg: DictConfig, stage: str) -> list[str]:
    tags = [f"stage:{stage}"]
    for group in STAGE_GROUPS.get(stage, STAGE_GROUPS["attribute"]):
        if group in cfg and cfg[group] is not None:
            tags.append(f"{group}:{node_name(cfg[group])}")
    tags += list(cfg.logger.get("tags") or [])
    return tags


def init_wandb(cfg: DictConfig, stage: str, name: str):
    """A W&B run for this stage, or None when `logger=none` (`mode: disabled`, conf/logger/none.yaml)
    or the config has no logger. Finish it with :func:`finish`."""
    lg = cfg.get("logger")
    if lg is None or lg.mode == "disabled":
        return None
    mode = os.environ.get("WANDB_MODE") or lg.mode
    wandb_dir = check_wandb_dir(cfg) or Path(lg.dir).expanduser().resolve()
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _has_netrc_key()):
        raise RuntimeError("logger.mode=online needs a W&B account: run `wandb login` or set WANDB_API_KEY, "
                           "or keep the default logger.mode=offline and `wandb sync` later")
    keep_wandb_files_under(wandb_dir)
    import wandb  # noqa: PLC0415 - slow to import, and only after its directories are set (above)

    run = wandb.init(project=lg.project, entity=lg.get("entity"), group=wandb_group(cfg),
                     job_type=stage, name=name, tags=wandb_tags(cfg, stage), mode=mode, dir=str(wandb_dir),
                     config=to_container(cfg), reinit="create_new",
                     settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
    _open_runs.append(run)
    # W&B's own fallback for a directory it cannot write: a temporary one, outside the run tree
    if mode != "disabled" and not Path(run.dir).resolve().is_relative_to(wandb_dir):
        finish(run, USER_ERROR_EXIT)
        raise UserError(f"W&B wrote this run into {run.dir}, not under logger.dir={wandb_dir}; give logger.dir a "
                        f"writable directory, or logger=none to run without W&B")
    return run


def check_wandb_dir(cfg: DictConfig) -> Path | None:
    """The directory W&B keeps its files in (`logger.dir`), once it is known that they can be
    written there; None without W&B (`logger=none`, no logger). W&B itself would put a run whose
    directory cannot be written into a temporary directory outside the run tree, so it is
    refused before any work runs (tda.preflight.check_config), in one line naming the fix."""
    lg = cfg.get("logger")
    if lg is None or lg.mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return None
    wandb_dir = Path(lg.dir).expanduser().resolve()
    why = unwritable_directory(wandb_dir) or unwritable_directory(wandb_dir / "wandb")
    if why:
        raise UserError(f"W&B cannot write its files in logger.dir={wandb_dir}: {why}. Give logger.dir a writable "
                        f"directory (logger.dir=<dir>), or run without W&B (logger=none)")
    return wandb_dir


# Runs started by init_wandb and not yet finished: an entry point that ends with an exception
# finishes those its stage left open as failed (finish_open_runs), whatever path the stage took.
_open_runs: list[Any] = []


def wandb_group(cfg: DictConfig) -> str:
    """`logger.group`, else the experiment's `name` (conf/experiment/*.yaml set it; by default
    `<dataset>-<model>`, see conf/common.yaml), else `<dataset>-<model>`."""
    group = cfg.logger.get("group") or cfg.get("name")
    if not group or group == "default":
        group = "-".join(node_name(cfg[k], key=k) if cfg.get(k) is not None else k for k in ("dataset", "model"))
    return str(group)


# W&B's own files outside its run directories: the artifact cache and wandb-core's logs
# (WANDB_CACHE_DIR, default ~/.cache/wandb) and artifact staging (WANDB_DATA_DIR, default
# ~/.local/share/wandb). An environment variable the user set wins.
WANDB_DIR_VARIABLES = {"WANDB_CACHE_DIR": "cache", "WANDB_DATA_DIR": "data"}


def keep_wandb_files_under(wandb_dir: Path) -> None:
    """Make W&B keep all its files under `logger.dir` (default `paths.runs_dir`): run
    directories in `<dir>/wandb/`, its cache and staging in `<dir>/wandb/{cache,data}`.
    Must run before the first `wandb.init` of the process (W&B's service reads them then)."""
    wandb_dir.mkdir(parents=True, exist_ok=True)
    for var, sub in WANDB_DIR_VARIABLES.items():
        if not os.environ.get(var):
            os.environ[var] = str(wandb_dir / "wandb" / sub)


def _has_netrc_key() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text()


def finish(run: Any, exit_code: int | None = None) -> None:
    """Finish a W&B run: as failed (non-zero exit code) when called while an exception
    propagates, i.e. from the `finally` of the stage that failed or was interrupted (130 / 143
    for SIGINT / SIGTERM, see tda.interrupt; 1 for an error), else as finished (0)."""
    if run is None:
        return
    _open_runs[:] = [r for r in _open_runs if r is not run]
    run.finish(exit_code=exit_code_of(sys.exc_info()[1]) if exit_code is None else int(exit_code))


def finish_open_runs(exit_code: int) -> None:
    """Finish every run this process started and did not finish, with `exit_code` (the
    entry point's, when its stage ended with an exception before its own `finish`)."""
    for run in reversed(list(_open_runs)):
        finish(run, exit_code)


def mark_cached(run: Any) -> Any:
    """Tag a run whose work was already done (tag `cached`, summary `cached: true`); it logs no
    `seconds` / `peak_mb`, which would time a cache look-up as if it were the computation."""
    if run is not None:
        run.tags = tuple(run.tags or ()) + ("cached",)
        run.summary["cached"] = True
    return run


def log_gold_progress(wb: Any, gold: Any) -> None:
    """After further training: per checkpoint, the size of the gold-standard attribution
    (mean over test instances of the L2 norm over left-out instances, centred and not), so
    the dashboard shows how the measured effect grows with further training and whether it
    stays far above float resolution. `gold`: the seeds merged so far, a
    tda.further_training.store.GoldStandard."""
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
