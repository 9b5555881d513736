"""Where the Hydra configs are.

In a checkout (and an editable install) they are the repository's top-level `conf/`; a wheel
(`pip install .`) ships the same files inside the package as `tda/conf/` (pyproject.toml maps
`conf/` to the package `tda.conf`). The packaged copy wins when present, so an installed `tda`
never picks up an unrelated `conf/` that happens to sit next to site-packages."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGED_CONFIG_DIR = PACKAGE_DIR / "conf"  # in a wheel
CHECKOUT_CONFIG_DIR = PACKAGE_DIR.parent / "conf"  # in a checkout / editable install


def config_dir() -> Path:
    """The directory holding `train.yaml`, `attribute.yaml`, `evaluate.yaml` and the config groups."""
    for candidate in (PACKAGED_CONFIG_DIR, CHECKOUT_CONFIG_DIR):
        if (candidate / "common.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"tda's configs are missing: neither {PACKAGED_CONFIG_DIR} (installed package) nor "
                            f"{CHECKOUT_CONFIG_DIR} (repository checkout) holds common.yaml. Reinstall tda "
                            f"(`pip install .` from the repository root).")
