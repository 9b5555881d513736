"""Evaluate stage: see tda.stages.evaluate. Usage: `python evaluate.py [overrides]` (Hydra)."""

import hydra
from omegaconf import DictConfig

from tda.interrupt import run_entry_point
from tda.stages import evaluate as run_stage


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_entry_point("evaluate", run_stage, cfg)  # SIGTERM / SIGINT: exit 143 / 130 saying what was kept


if __name__ == "__main__":
    main()
