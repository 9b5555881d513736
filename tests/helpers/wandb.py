"""W&B runs of the tests, read back offline: the offline run directories under a runs folder, what
each run logged (through W&B's own reader of its transaction log, `wandb leet inspect --json`,
shipped with wandb 0.31; no network needed), and overrides that turn W&B logging on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def wandb_on(overrides: list[str]) -> list[str]:
    """The overrides with `logger=wandb` (offline: the tests' environment sets WANDB_MODE)."""
    return [o for o in overrides if not o.startswith("logger=")] + ["logger=wandb"]


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
    "tables": {key: {"columns", "data"}} read from the run's `files/media/table`,
    "exit_code": the code the run finished with (None: it never finished), "state": "finished"
    (exit code 0), "failed" (non-zero) or "crashed" (no exit record), as W&B shows it}."""
    run_dir = Path(run_dir)
    files = list(run_dir.glob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"{run_dir} holds {len(files)} run-*.wandb files; pass one offline run directory")
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(files[0])],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"`wandb leet inspect --json {files[0]}` failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out: dict[str, Any] = {"run": {}, "config": {}, "history": [], "summary": {}, "metrics": [], "tables": {},
                           "exit_code": None}
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
        elif kind == "exit":
            out["exit_code"] = int(rec["exit"].get("exit_code", 0))
    out["state"] = "crashed" if out["exit_code"] is None else "finished" if out["exit_code"] == 0 else "failed"
    out["config"].pop("_wandb", None)
    # tables: the summary points at the JSON file of each logged wandb.Table
    for key, value in out["summary"].items():
        if key.endswith(".path") and str(value).endswith(".table.json"):
            path = run_dir / "files" / str(value)
            if path.is_file():
                out["tables"][key[: -len(".path")]] = json.loads(path.read_text())
    return out
