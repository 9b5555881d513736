"""The environment a job runs in: offline mode (no downloads from dataset or model hubs)."""

from __future__ import annotations

import os

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TDA_OFFLINE")


def offline() -> bool:
    """Whether downloads are off: any of HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, TDA_OFFLINE set."""
    return any(os.environ.get(v, "0") not in ("0", "", "false", "False") for v in OFFLINE_VARIABLES)
