"""Train stage: see tda.stages.train. Usage: `python train.py [overrides]` (Hydra)."""

import hydra
from omegaconf import DictConfig

from tda.interrupt import run_entry_point
from tda.stages import train as run_stage


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run_entry_point("train", run_stage, cfg)  # SIGTERM / SIGINT: exit 143 / 130 saying what was kept


if __name__ == "__main__":
    main()
