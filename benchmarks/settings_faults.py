"""Every numeric setting of conf/ at absurd values, and how each ends: the fault sweep of
docs/scale_out.md ("Bad input").

The settings are enumerated from the composed configs, not listed by hand: the plain sections
(train, selection, further_training, attribution, trainer, evaluate, seed; a null setting counts
when its type admits a number) and the `_target_` node of every option of every config group
(dataset, model, optimizer, further_optimizer, method: the keys its YAML file sets, numbers and
nulls whose constructor parameter takes one, and each element of a list of numbers). Each is set
to each of FAULTS (0, −1, huge, NaN, ∞; `huge` is 10¹² for an integer, 1e300 for a float) and the
stage's pre-flight (tda.preflight.check_config, which for a method also builds it) is run on the
composed config. With `--run`, each value the pre-flight accepts is then run through the stages
it affects, on tiny data, in a subprocess, with a timeout after which it is sent SIGTERM; its exit
status and last line of stderr are recorded.

    python -m benchmarks.settings_faults                    # pre-flight only (a minute)
    python -m benchmarks.settings_faults --run --out benchmarks/results/settings_faults.json

tests/test_settings_faults.py runs the pre-flight part and asserts that no value ends in an
exception other than a refusal naming the setting, that NaN and ∞ are refused everywhere and
that huge counts are refused.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from tda.config import ConfigError, import_target
from tda.preflight import check_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = ("dataset", "model", "optimizer", "further_optimizer", "method")
# the plain sections (tda.preflight.SECTIONS) and the top-level seed
SECTIONS = ("train", "selection", "further_training", "attribution", "trainer", "evaluate")
HUGE_INT, HUGE_FLOAT = 10**12, 1e300
PARSER = OverridesParser.create()
# small settings for the runs of `--run` (those of tests/helpers/config.py TINY)
TINY = ["dataset.max_train=96", "dataset.max_test=40", "train.epochs=3", "train.batch_size=16",
        "selection.n_left_out=8", "selection.n_test=6", "further_training.epochs=2",
        "further_training.batch_size=16", "further_training.n_seeds=2", "trainer.progress_bar=false",
        "logger=none"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One setting at one value: `context` selects the group option (e.g. ["method=lissa"]),
    `override` sets the value (e.g. "method.divergence_factor=1e300")."""

    context: tuple[str, ...]
    key: str
    kind: str  # int | float
    fault: str  # 0 | -1 | huge | nan | inf
    override: str

    @property
    def stage(self) -> str:
        return "further_train" if "method=further_training" in self.context else "attribute"


def fault_values(kind: str) -> dict[str, Any]:
    return {"0": 0, "-1": -1, "huge": HUGE_INT if kind == "int" else HUGE_FLOAT, "nan": math.nan, "inf": math.inf}


def literal(value: Any) -> str:
    """A value as a Hydra override writes it."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, list):
        return "[" + ",".join(literal(v) for v in value) + "]"
    return "null" if value is None else str(value)


def _numeric_kind(hint: Any) -> str | None:
    """int / float when a type annotation admits a number (int wins: an int setting takes no float)."""
    args = set(typing.get_args(hint)) | {hint}
    if int in args:
        return "int"
    if float in args:
        return "float"
    return None


def section_keys(cfg) -> list[tuple[str, str, Any]]:
    """(dotted key, int | float, current value) of every numeric setting of the plain sections."""
    from tda.preflight import SECTIONS as TYPES  # noqa: PLC0415 - imports torch: only when enumerating

    out = [("seed", "int", cfg.seed)]

    def walk(cls, node, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint, value = hints[f.name], (node or {}).get(f.name)
            if isinstance(hint, type) and dataclasses.is_dataclass(hint):
                walk(hint, value, f"{prefix}{f.name}.")
                continue
            kind = _numeric_kind(hint)
            lists = [h for h in (hint, *typing.get_args(hint)) if typing.get_origin(h) is list]
            list_kind = _numeric_kind(typing.get_args(lists[0])[0]) if lists else None
            if kind is not None and not isinstance(value, (bool, list, str)):
                out.append((f"{prefix}{f.name}", kind, value))
            elif list_kind is not None and isinstance(value, list):
                for i, v in enumerate(value):
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        out.append((f"{prefix}{f.name}[{i}]", list_kind, value))
    plain = OmegaConf.to_container(cfg, resolve=True)
    for name in SECTIONS:
        walk(TYPES[name], plain.get(name), f"{name}.")
    return out


def node_keys(cfg, group: str) -> list[tuple[str, str, Any]]:
    """(dotted key, int | float, current value) of every numeric argument of a `_target_` node:
    numbers in its YAML, nulls whose constructor parameter takes a number, list elements."""
    node = OmegaConf.to_container(cfg[group], resolve=True) if cfg.get(group) is not None else None
    if not node or "_target_" not in node:
        return []
    obj = import_target(node["_target_"])
    params = {}
    if obj is not None:
        try:
            hints = typing.get_type_hints(obj.__init__ if isinstance(obj, type) else obj)
        except Exception:  # noqa: BLE001 - a third-party signature (torch's optimizers) with unresolvable hints
            hints = {}
        params = {name: hints.get(name, p.annotation) for name, p in inspect.signature(obj).parameters.items()}
    out = []
    for key, value in node.items():
        if key.startswith("_") or key == "name" or isinstance(value, (bool, str)):
            continue
        if isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out.append((f"{group}.{key}[{i}]", "int" if isinstance(v, int) else "float", value))
        elif isinstance(value, (int, float)):
            kind = _numeric_kind(params.get(key)) or ("int" if isinstance(value, int) else "float")
            out.append((f"{group}.{key}", kind, value))
        elif value is None and _numeric_kind(params.get(key)) is not None:
            out.append((f"{group}.{key}", _numeric_kind(params[key]), value))
    return out


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def cases() -> list[Case]:
    """Every (setting, fault): the plain sections once, each group option's node once."""
    out = []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        contexts: list[tuple[tuple[str, ...], list]] = []
        base = compose(config_name="attribute", overrides=TINY)
        contexts.append(((), section_keys(base) + [k for g in GROUPS for k in node_keys(base, g)]))
        defaults = {g: base[g].get("name") for g in GROUPS}
        for group in GROUPS:
            for option in options(group):
                if option == defaults[group]:
                    continue
                cfg = compose(config_name="attribute", overrides=TINY + [f"{group}={option}"])
                contexts.append(((f"{group}={option}",), node_keys(cfg, group)))
    for context, keys in contexts:
        for key, kind, value in keys:
            for fault, v in fault_values(kind).items():
                if "[" in key:  # an element of a list
                    name, index = key[:-1].split("[")
                    items = list(value)
                    items[int(index)] = v
                    override = f"{name}={literal(items)}"
                else:
                    override = f"{key}={literal(v)}"
                out.append(Case(context, key, kind, fault, override))
    return out


# ------------------------------------------------------------------------------ the pre-flight
def preflight(case_list: list[Case]) -> list[dict[str, Any]]:
    """Each case's pre-flight outcome: `refused` (a ConfigError: its first problem naming the
    setting), `accepted`, or `error` (any other exception: a bug). Each context is composed once
    by Hydra and each value set on a copy (as an override on the command line sets it)."""

    rows, composed = [], {}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for case in case_list:
            row = dataclasses.asdict(case)
            try:
                key = (case.stage, case.context)
                if key not in composed:
                    composed[key] = compose(config_name=case.stage, overrides=TINY + list(case.context))
                cfg = copy.deepcopy(composed[key])
                override = PARSER.parse_override(case.override)
                OmegaConf.update(cfg, override.key_or_group, override.value(), force_add=False)
                check_config(cfg, case.stage)
                row["preflight"], row["message"] = "accepted", ""
            except ConfigError as err:
                problems = [p for p in err.problems if case.key.split("[")[0] in p] or err.problems
                row["preflight"], row["message"] = "refused", problems[0].splitlines()[0]
            except Exception as err:  # noqa: BLE001 - recorded: any other exception in a pre-flight is a bug
                row["preflight"], row["message"] = "error", f"{type(err).__name__}: {err}".splitlines()[0]
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------ the stages
RUNNER = r"""
import json, sys
from hydra import compose, initialize_config_dir
from tda.interrupt import run_entry_point
import tda.stages
conf, stages, overrides = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
with initialize_config_dir(config_dir=conf, version_base="1.3"):
    for stage, extra in stages:
        cfg = compose(config_name=stage, overrides=overrides + extra)
        run_entry_point(stage, getattr(tda.stages, stage), cfg, tda.stages.KEPT[stage])
"""


def stages_of(case: Case) -> list[tuple[str, list[str]]]:
    """The stages a setting affects, in order, each with its extra overrides."""
    train = [("train", [])]
    gold = [("further_train", [])]
    method = [("attribute", [])]
    evaluate = [("evaluate", [])]
    section = case.key.split(".")[0].split("[")[0]
    if case.stage == "further_train" or section in ("further_training", "further_optimizer"):
        return train + gold + [("attribute", ["method=grad_dot"])] + evaluate
    if section == "method":
        return train + method
    if section == "evaluate":
        return train + gold + [("attribute", ["method=grad_dot"])] + evaluate
    return train + gold + [("attribute", ["method=grad_dot"])] + evaluate


def run_case(case: Case, runs_dir: Path, timeout: float) -> dict[str, Any]:
    """The stages of an accepted case in a subprocess: exit status, last stderr line, seconds;
    SIGTERM after `timeout` seconds (then the exit status says whether it stopped cleanly)."""
    env = dict(os.environ, TDA_RUNS_DIR=str(runs_dir), WANDB_MODE="offline", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    overrides = TINY + list(case.context) + [case.override]
    cmd = [sys.executable, "-c", RUNNER, str(CONF), json.dumps(stages_of(case)), json.dumps(overrides)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    terminated = False
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        terminated = True
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    lines = [ln for ln in (err or "").splitlines() if ln.strip()]
    traceback = any(ln.startswith("Traceback") for ln in lines)
    last = lines[-1] if lines else ""
    return {"exit": proc.returncode, "terminated": terminated, "traceback": traceback, "last_line": last[:400],
            "seconds": round(time.monotonic() - t0, 1)}


def outcome(row: dict[str, Any]) -> str:
    """How a case ended, in a word: refused at pre-flight | pre-flight error | completed |
    refused later | stopped by SIGTERM | traceback | killed."""
    if row["preflight"] != "accepted":
        return "refused at pre-flight" if row["preflight"] == "refused" else "pre-flight error"
    run = row.get("run")
    if run is None:
        return "accepted (not run)"
    if run["traceback"]:
        return "traceback"
    if run["terminated"]:
        return "stopped by SIGTERM" if run["exit"] == 143 and "interrupted by SIGTERM" in run["last_line"] else "killed"
    return {0: "completed", 2: "refused later (one line)"}.get(run["exit"], f"exit {run['exit']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="run the stages of every accepted value")
    parser.add_argument("--timeout", type=float, default=90, help="seconds before SIGTERM (with --run)")
    parser.add_argument("--only", default="", help="only keys containing this text")
    parser.add_argument("--out", type=Path, help="write the rows and the tally as JSON")
    args = parser.parse_args()
    selected = [c for c in cases() if args.only in c.key]
    rows = preflight(selected)
    if args.run:
        with tempfile.TemporaryDirectory(prefix="settings_faults-") as tmp:
            accepted = [r for r in rows if r["preflight"] == "accepted"]
            for i, row in enumerate(accepted):
                case = Case(tuple(row["context"]), row["key"], row["kind"], row["fault"], row["override"])
                row["run"] = run_case(case, Path(tmp), args.timeout)
                print(f"[{i + 1}/{len(accepted)}] {' '.join(case.context)} {case.override}: {outcome(row)} "
                      f"({row['run']['seconds']}s) {row['run']['last_line'][:160]}", flush=True)
    for row in rows:
        row["outcome"] = outcome(row)
    tally = dict(collections.Counter(r["outcome"] for r in rows))
    print(json.dumps({"cases": len(rows), "settings": len({(tuple(r['context']), r['key']) for r in rows}),
                      "tally": tally}, indent=2))
    for row in rows:
        if row["outcome"] not in ("refused at pre-flight",):
            print(f"{row['outcome']:>24}  {' '.join(row['context']):<28} {row['override']:<48} "
                  f"{row.get('run', {}).get('last_line', row['message'])[:150]}")
    if args.out:
        args.out.write_text(json.dumps({"cases": len(rows), "tally": tally, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
