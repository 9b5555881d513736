"""The README's first command from a cold start, timed part by part: a copy of the checkout (as a
clean clone has it), a fresh virtual environment, a fresh home (no pip, Hugging Face, W&B or
matplotlib cache, unless --pip-cache warm), then every `&&`-separated part of the command exactly
as the README writes it (install torch from disk, install tda's core, train, attribute, evaluate).

Afterwards, in the same fresh environment (core only), configs that need an extra are run to
check that each is refused in one line naming the `pip install` that fixes it (exit status 2,
nothing trained).

    python -m benchmarks.cold_start               # the working tree; writes benchmarks/results/cold_start.json
    python -m benchmarks.cold_start --ref main --out /tmp/cold_main.json   # a commit, for a side-by-side

Wall-clock seconds depend on the machine's load: the JSON records the load average before and
after and the CPU seconds of every part (which load affects less). The README quotes the figure
this script prints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# configs that need an extra the core lacks, refused before anything is trained
REFUSED = ["dataset=sst2", "dataset=concrete", "dataset=folktables"]


def readme_command(readme: Path) -> str:
    """The README's first command: the first line of its first ```bash block."""
    match = re.search(r"```bash\n(.+?)\n", readme.read_text())
    if match is None:
        raise SystemExit(f"{readme} has no ```bash block")
    return match.group(1).strip()


def copy_checkout(ref: str | None, dest: Path) -> None:
    """The files a clean clone has: `ref`'s tree, or the working tree's tracked and unignored files."""
    dest.mkdir(parents=True)
    if ref:
        archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def fresh_env(home: Path, pip_cache: str) -> dict[str, str]:
    """A newcomer's environment: a new HOME (empty caches), no virtual environment active,
    none of tda's or the tests' variables."""
    drop = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "TDA_", "WANDB_", "HF_", "XDG_", "MPLCONFIGDIR",
            "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PIP_CACHE_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    venv = os.environ.get("VIRTUAL_ENV")
    if venv:  # the caller's venv off PATH, so that `python3` is the system's, as for a newcomer
        env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(venv))
    env["HOME"] = str(home)
    if pip_cache == "warm":
        env["PIP_CACHE_DIR"] = str(Path.home() / ".cache" / "pip")
    return env


def timed(command: str, cwd: Path, env: dict[str, str], log: Path) -> dict:
    """Run one part of the command in bash (the venv activated once it exists); wall and CPU seconds."""
    activate = ". .venv/bin/activate && " if (cwd / ".venv" / "bin" / "activate").is_file() else ""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n$ {command}\n")
        out.flush()
        rc = subprocess.run(["bash", "-c", activate + command], cwd=cwd, env=env, stdout=out, stderr=out,
                            stdin=subprocess.DEVNULL).returncode
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"command": command, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "exit": rc}


def kind(command: str) -> str:
    """What a part of the README command is: install, train, attribute, evaluate (or setup)."""
    for word in ("train", "attribute", "evaluate"):
        if re.search(rf"\b{word}\.py\b", command):
            return word
    return "install" if command.startswith("pip ") else "setup"


def refusal(override: str, cwd: Path, env: dict[str, str]) -> dict:
    """`python train.py <override>` in the core-only venv: exit 2, one line naming `pip install`."""
    proc = subprocess.run(["bash", "-c", f". .venv/bin/activate && python train.py {override}"], cwd=cwd, env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    ok = proc.returncode == 2 and len(lines) == 1 and "pip install" in lines[0]
    return {"override": override, "exit": proc.returncode, "stderr": proc.stderr.strip()[-2000:], "one_line_fix": ok}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", help="a git ref to measure instead of the working tree (e.g. main)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cold_start.json")
    parser.add_argument("--pip-cache", choices=("cold", "warm"), default="cold",
                        help="cold: pip starts with an empty cache, as a newcomer's (default); warm: the user's")
    parser.add_argument("--keep", action="store_true", help="keep the temporary checkout (its path is printed)")
    parser.add_argument("--no-refusals", action="store_true",
                        help="skip the refusal checks (for a ref from before the extras existed)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tda-cold-start-"))
    checkout, home = work / "tda", work / "home"
    home.mkdir()
    copy_checkout(args.ref, checkout)
    command = readme_command(checkout / "README.md")
    env, log = fresh_env(home, args.pip_cache), work / "cold_start.log"
    load_before = os.getloadavg()
    parts = []
    for part in (p.strip() for p in command.split("&&")):
        parts.append(timed(part, checkout, env, log) | {"kind": kind(part)})
        print(f"{parts[-1]['seconds']:8.1f} s ({parts[-1]['cpu_seconds']:.1f} CPU-s)  {part}", flush=True)
        if parts[-1]["exit"] != 0:
            print(log.read_text()[-4000:], file=sys.stderr)
            raise SystemExit(f"`{part}` failed (exit {parts[-1]['exit']}); log: {log}")
    load_after = os.getloadavg()
    packages = json.loads(subprocess.run(["bash", "-c", ". .venv/bin/activate && pip list --format=json"],
                                         cwd=checkout, env=env, capture_output=True, text=True, check=True).stdout)
    refusals = [] if args.no_refusals else [refusal(o, checkout, env) for o in REFUSED]

    def total(*kinds: str, key: str = "seconds") -> float:
        return round(sum(p[key] for p in parts if p["kind"] in kinds), 1)

    result = {
        "command": command, "ref": args.ref or "working tree", "pip_cache": args.pip_cache,
        "total_seconds": total("setup", "install", "train", "attribute", "evaluate"),
        "install_seconds": total("setup", "install"),
        "job_seconds": total("train", "attribute", "evaluate"),
        "total_cpu_seconds": total("setup", "install", "train", "attribute", "evaluate", key="cpu_seconds"),
        "stage_seconds": {k: total(k) for k in ("train", "attribute", "evaluate")},
        "parts": parts,
        "packages_installed": len(packages),
        "packages": sorted(f"{p['name']}=={p['version']}" for p in packages),
        "refusals": refusals,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in load_after]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in result["stage_seconds"].items())
    print(f"cold start: {result['total_seconds']:.0f} s = install {result['install_seconds']:.0f} s "
          f"({result['packages_installed']} packages) + {stages} ({result['total_cpu_seconds']:.0f} CPU-s); "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; {args.out}")
    for r in refusals:
        print(f"  {r['override']}: exit {r['exit']}, {'one line with the fix' if r['one_line_fix'] else 'NOT one line'}"
              f": {r['stderr'].splitlines()[-1] if r['stderr'] else ''}")
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    if not all(r["one_line_fix"] for r in refusals):
        raise SystemExit("a config that needs an extra was not refused in one line naming the fix")


if __name__ == "__main__":
    main()
