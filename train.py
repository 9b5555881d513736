"""Train stage: see tda.stages.train. Usage: `python train.py [overrides]` (Hydra)."""

import hydra
from omegaconf import DictConfig

from tda.stages import train as run_stage


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run_stage(cfg)


if __name__ == "__main__":
    main()
