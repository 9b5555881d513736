"""The command line: each stage as a Hydra app, run by the console scripts `tda-train`,
`tda-further-train`, `tda-attribute`, `tda-evaluate` and by the top-level scripts `train.py`,
`attribute.py`, `evaluate.py` alike (same configs, tda.resources.config_dir; same overrides,
`-m` for sweeps).

Errors are reported as Hydra users expect: a user error (tda.exits.is_user_error: a bad value,
a missing final model, a refused artifact, and Hydra's own config errors such as an unknown key
or option) prints one message naming the problem and the fix to stderr and exits 2;
`HYDRA_FULL_ERROR=1` shows its traceback instead. A bug shows its traceback (exit 1), an
interruption says what was kept (exit 128 + signal; tda.interrupt).

The stages (torch, Lightning, datasets) are imported once Hydra has composed the config, so that
a mistake on the command line is reported at once.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from tda.exits import USER_ERROR_EXIT, Interrupted
from tda.extras import launcher_message
from tda.interrupt import FULL_ERROR, exit_on_user_error, is_multirun, run_entry_point, signals_raise, sweep_interrupted
from tda.resources import config_dir


def run_stage(stage: str) -> None:
    """Run the Hydra app of `stage` (a function of tda.stages; config `<stage>.yaml`) on the
    command line's overrides."""
    missing_launcher = launcher_message(sys.argv[1:])
    if missing_launcher:
        print(f"Error: {missing_launcher}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT)
    users_setting = os.environ.get(FULL_ERROR)

    def task(cfg: DictConfig) -> None:
        _set_full_error(users_setting)  # from here on Hydra reports errors as the user asked
        import tda.stages  # noqa: PLC0415 - heavy: only once the command line has composed into a config

        run_entry_point(stage, getattr(tda.stages, stage), cfg, tda.stages.KEPT[stage])

    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=stage)(task)
    # Until the task starts (composing the config), Hydra raises its errors instead of printing
    # them, so that a user error among them can exit 2 like the stages' own.
    os.environ[FULL_ERROR] = "1"
    try:
        if is_multirun(sys.argv[1:]):  # a signal to this process alone must stop the sweep's workers too
            with signals_raise():
                app()
        else:
            app()
    except Interrupted as err:  # a multirun, interrupted here (a job in this process exits on its own)
        raise sweep_interrupted(stage, err) from None
    except Exception as err:
        _set_full_error(users_setting)
        exit_on_user_error(err)
        raise
    finally:
        _set_full_error(users_setting)


def _set_full_error(value: str | None) -> None:
    if value is None:
        os.environ.pop(FULL_ERROR, None)
    else:
        os.environ[FULL_ERROR] = value


def train() -> None:
    """`tda-train [overrides]`: train the final model (tda.stages.train)."""
    run_stage("train")


def attribute() -> None:
    """`tda-attribute [overrides]`: a method's scores, or the gold standard (tda.stages.attribute)."""
    run_stage("attribute")


def further_train() -> None:
    """`tda-further-train [overrides]`: the gold standard (tda.stages.further_train); the alias
    `attribute.py method=further_training` runs the same stage."""
    run_stage("further_train")


def evaluate() -> None:
    """`tda-evaluate [overrides]`: compare the methods with the gold standard (tda.stages.evaluate)."""
    run_stage("evaluate")
