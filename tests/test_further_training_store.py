"""The gold standard on disk (tda.further_training.store): its key, the files of a job, merging
seed and left-out shards (also written through Hydra's submitit launcher) into the unsharded result,
naming a missing or doubled part, ignoring temporary files, averaging the seeds of the config; and
outside tda.further_training only the store (and the typed settings) are used."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from helpers.config import ROOT, compose_config
from helpers.further_training import F64, job_for, toy_problem
from helpers.processes import finish_logged, start_logged
from helpers.runs import BASE, gold_dir_of

from tda.artifacts import load_json
from tda.further_training.attribution import postprocess
from tda.further_training.store import GoldStandardSpec, further_training_key, load_gold_standard, seed_file
from tda.stages import attribute, evaluate


def test_job_files_follow_the_shard_settings(tmp_path):
    spec = GoldStandardSpec.from_config(compose_config("further_train", ["further_training.n_seeds=3"]))
    assert spec.job_files(tmp_path) == [seed_file(tmp_path, s) for s in (0, 1, 2)]
    assert not spec.settings.is_sharded
    spec = GoldStandardSpec.from_config(compose_config("further_train", [
        "further_training.n_seeds=3", "further_training.shard_seeds=[2]", "further_training.left_out_shard.index=1",
        "further_training.left_out_shard.count=2"]))
    assert [p.name for p in spec.job_files(tmp_path)] == ["seed_00002.part_02_of_02.safetensors"]
    assert spec.settings.is_sharded and spec.settings.left_out_block(5) == (2, 5)


def test_postprocess_adjust_centre_and_windows():
    torch.manual_seed(0)
    diff = torch.randn(2, 3, 4, 6, dtype=F64)
    full = torch.randn(2, 3, 6, dtype=F64)
    init = torch.randn(3, dtype=F64)
    a = postprocess(diff, full, init, center=False, adjust=True)
    assert torch.allclose(a, diff.mean(-1))
    raw = postprocess(diff, full, init, center=False, adjust=False)
    assert torch.allclose(raw, (diff + (full - init[None, :, None]).unsqueeze(2)).mean(-1))
    c = postprocess(diff, full, init, center=True, seeds=slice(0, 2))
    assert torch.allclose(c.mean(dim=2), torch.zeros(2, 3, dtype=F64), atol=1e-15)
    assert torch.allclose(c, (diff[..., :2] - diff[..., :2].mean(2, keepdim=True)).mean(-1))


# ------------------------------------------------------------------ seed files and shards
def test_partial_and_temporary_gold_files_are_not_taken_for_seeds(tiny, pipeline):
    cfg = compose_config("attribute", tiny + ["method=further_training"])
    gold_dir = attribute(cfg)  # finds every seed done
    run = pipeline
    # a temporary file a killed writer left behind is not seed 5, and not a part of seed 0
    (gold_dir / ".seed_00005.safetensors.abc123.tmp").write_bytes(b"partial")
    (gold_dir / ".seed_00000.part_01_of_02.safetensors.x.tmp").write_bytes(b"partial")
    assert load_gold_standard(gold_dir).seeds == [0, 1]
    # a damaged seed file is reported as corrupt, naming the file and the fix
    data = seed_file(gold_dir, 1).read_bytes()
    seed_file(gold_dir, 1).write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="corrupt artifact .*seed_00001.safetensors.*delete it and re-run"):
        load_gold_standard(gold_dir)
    assert run.final_model.is_file()


def test_evaluate_averages_the_seeds_of_the_config_not_of_meta_json(runs):
    gold = load_gold_standard(gold_dir_of(BASE), seeds=[0, 1, 2])
    assert gold.seeds == [0, 1, 2]
    out = evaluate(compose_config("evaluate", BASE))
    assert load_json(out / "evaluated.json")["seeds"] == [0, 1, 2]
    seed_file(gold_dir_of(BASE), 2).unlink()
    with pytest.raises(FileNotFoundError, match="missing seed 2"):
        evaluate(compose_config("evaluate", BASE))


@pytest.mark.slow
def test_shards_merge_to_the_unsharded_gold_standard(tmp_path):
    cfg, problem = toy_problem([])
    job_for(cfg).run(problem, tmp_path / "whole")
    keys = set()
    for shard_seeds, index in (([0, 2], 0), ([0, 2], 1), ([0, 2], 2), ([1], 0), ([1], 1), ([1], 2)):
        cfg_s, problem_s = toy_problem([f"further_training.shard_seeds=[{','.join(map(str, shard_seeds))}]",
                                        f"further_training.left_out_shard.index={index}",
                                        "further_training.left_out_shard.count=3",
                                        "further_training.max_runs_per_group=2"])
        keys.add(further_training_key(cfg_s))
        job_for(cfg_s).run(problem_s, tmp_path / "sharded")
    assert keys == {further_training_key(cfg)}
    assert (tmp_path / "sharded" / "seed_00001.part_03_of_03.safetensors").is_file()
    whole, merged = load_gold_standard(tmp_path / "whole"), load_gold_standard(tmp_path / "sharded")
    assert merged.seeds == whole.seeds
    assert float((whole.diff - merged.diff).abs().max()) < 1e-12
    # a missing part is named; a second sharding of the same seed is a conflict
    (tmp_path / "sharded" / "seed_00001.part_02_of_03.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"seed 1: parts \[2\] of 3"):
        load_gold_standard(tmp_path / "sharded")
    (tmp_path / "whole" / "seed_00001.safetensors").rename(tmp_path / "sharded" / "seed_00001.safetensors")
    with pytest.raises(ValueError, match="seed 1 has files of different shardings"):
        load_gold_standard(tmp_path / "sharded")


@pytest.mark.slow
def test_sharded_gold_standard_through_submitit_equals_unsharded(tiny, tmp_path, pipeline):
    import shutil

    overrides = list(tiny)  # 2 seeds
    cfg = compose_config("attribute", overrides + ["method=further_training"])
    ref = load_gold_standard(pipeline.gold_dir(further_training_key(cfg)))
    shutil.rmtree(pipeline.path / "gold")
    log = tmp_path / "log.txt"
    # two jobs, each one half of the left-out instances, through the launcher a cluster uses
    finish_logged(start_logged("attribute.py", ["-m", "hydra/launcher=submitit_local", *overrides,
                                                "method=further_training", "further_training.left_out_shard.count=2",
                                                "further_training.left_out_shard.index=0,1"], log), log)
    gold_dir = pipeline.gold_dir(further_training_key(cfg))
    assert sorted(p.name for p in gold_dir.glob("seed_*")) == [
        f"seed_0000{s}.part_0{i}_of_02.safetensors" for s in (0, 1) for i in (1, 2)]
    gold = load_gold_standard(gold_dir)  # the merge
    assert gold.seeds == ref.seeds and gold.diff.shape == ref.diff.shape
    torch.testing.assert_close(gold.diff, ref.diff, rtol=0, atol=1e-12)
    torch.testing.assert_close(gold.full_loss, ref.full_loss, rtol=0, atol=1e-12)

    # the merge in evaluate names a missing part ...
    part = gold_dir / "seed_00001.part_02_of_02.safetensors"
    part.rename(tmp_path / part.name)
    with pytest.raises(FileNotFoundError, match=r"missing seed 1: parts \[2\] of 2"):
        evaluate(compose_config("evaluate", overrides))
    (tmp_path / part.name).rename(part)
    # ... and a seed computed twice under different shardings
    attribute(compose_config("attribute", overrides + ["method=further_training", "further_training.shard_seeds=[0]"]))
    with pytest.raises(ValueError, match="seed 0 has files of different shardings"):
        evaluate(compose_config("evaluate", overrides))
    seed_file(gold_dir, 0).unlink()
    evaluate(compose_config("evaluate", overrides))


def test_seed_shards_fill_one_directory_and_equal_unsharded(tiny, pipeline):
    import shutil

    overrides = list(tiny)  # 2 seeds
    ref = load_gold_standard(pipeline.gold_dir(further_training_key(compose_config("attribute", overrides))))
    shutil.rmtree(pipeline.path / "gold")
    for shard in ("[1]", "[0]"):
        gold_dir = attribute(compose_config("attribute", overrides + ["method=further_training",
                                                                       f"further_training.shard_seeds={shard}"]))
    gold = load_gold_standard(gold_dir)
    assert gold.seeds == [0, 1]
    assert torch.equal(gold.diff, ref.diff) and torch.equal(gold.full_loss, ref.full_loss)


# ------------------------------------------------------------------ the package's boundary
def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_only_the_store_is_used_outside_further_training():
    """runs, tracking and the problem know nothing of further training; everything else outside
    the package finds and reads a gold standard through tda.further_training.store (and its
    attribution, and the gold standards beside it; the stage also runs the job; the config checks
    use its typed settings)."""
    for name in ("runs.py", "tracking.py", "problem.py"):
        assert not [m for m in _imported_modules(ROOT / "tda" / name) if m.startswith("tda.further_training")], name
    for path in sorted((ROOT / "tda").rglob("*.py")):
        if "further_training" in path.parts:
            continue
        used = {m for m in _imported_modules(path) if m.startswith("tda.further_training")}
        allowed = {f"tda.further_training.{m}" for m in ("store", "subset_store", "attribution", "related", "settings")}
        if path == ROOT / "tda" / "stages" / "gold.py":  # its jobs, and a subset run's seed
            allowed |= {f"tda.further_training.{m}" for m in ("gold_standard", "subset_gold", "subsets", "self_effect")}
        assert used <= allowed, (path, used - allowed)
