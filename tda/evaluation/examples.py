"""The examples view: for chosen test instances, the gold standard's most helpful and most
harmful left-out instances shown for people (tabular: feature names and values side by side;
text: the sentences; images: a strip of pictures), with each method's rank of them and
whether it agrees. Classification shows class names; regression the target and the final
model's prediction."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from tda.config import ConfigError, build
from tda.data.base import DataBundle
from tda.evaluation import plots
from tda.evaluation.curves import resolve_checkpoints
from tda.evaluation.markdown import centring, md_escape, md_table
from tda.evaluation.settings import ExamplesSettings
from tda.evaluation.top_k import top_instances, top_k_overlap
from tda.evaluation.undefined import GOLD_CONSTANT, UNDEFINED_COLUMNS, instance_reasons, sentence, undefined_rows
from tda.further_training.attribution import GoldStandard


def examples(settings: ExamplesSettings, model: DictConfig, gold: GoldStandard, scores: dict[str, torch.Tensor],
             out: Path, data: DataBundle, final_weights: dict[str, torch.Tensor]
             ) -> tuple[pd.DataFrame, str, list[Path], dict[str, tuple[float, float]]]:
    """The chosen test instances' top-k tables (`evaluate.examples`: `settings`), `examples.md`'s
    text, the image figures written into `out`, and every method's mean top-k (helpful, harmful)
    overlap with the gold standard over all test instances. `scores`: [n_test, n_left_out];
    `data`: the dataset the final model was trained on; `model`, `final_weights`: the final
    model's config node and state dict (for a regression model's predictions)."""
    n_test = len(gold.meta["test_indices"])
    positions = list(settings.test_positions or range(min(settings.n_test, n_test)))
    bad = [p for p in positions if not 0 <= p < n_test]
    if bad:
        raise ConfigError(f"evaluate.examples.test_positions {bad} out of range: {n_test} test instances were "
                          f"evaluated")
    k = settings.k
    t = resolve_checkpoints([settings.checkpoint], gold.n_checkpoints)[0]
    centered = settings.centered
    target = gold.attribution(center=centered)[t]  # [n_test, n_left_out]
    left_out, test_idx = gold.meta["left_out_indices"], gold.meta["test_indices"]
    table = top_instances(target, scores, positions, left_out, test_idx, k)
    overlap = {name: top_k_overlap(target, s, k) for name, s in scores.items()}
    x_name, xs = gold.checkpoint_axis()
    lines = ["# Most helpful and harmful left-out instances", "",
             f"Gold standard at {x_name} {xs[t]:g} ({centring(centered)}), top {k} of "
             f"{len(left_out)} left-out instances. A method *agrees* on an instance when it also ranks it in its own "
             f"top {k} (helpful) or bottom {k} (harmful). Mean top-{k} overlap with the gold standard over all "
             f"{n_test} test instances (helpful / harmful): "
             + ", ".join(f"{m} {_overlap(h)} / {_overlap(b)}" for m, (h, b) in overlap.items()), ""]
    undefined = [f"- {sentence(r)}" for name, s in scores.items() for _, r in pd.DataFrame(
        undefined_rows("top-k overlap", name, f"top-{k} overlap", None, [instance_reasons("top_k", target, s)]),
        columns=UNDEFINED_COLUMNS).iterrows()]  # a top k of constant scores would be the order of ties
    lines += undefined + [""] * bool(undefined)
    regression = data.task == "regression"
    if regression:
        predict = _predictor(model, data, final_weights)
        lines += [_regression_note(data), ""]
    figs = []
    for p in positions:
        sub = table[table.test_position == p] if len(table) else table
        test_view = data.describe("test", test_idx[p])
        if not len(sub):
            lines += [f"## Test instance {test_idx[p]}", "",
                      f"No most helpful or harmful left-out instances: {GOLD_CONSTANT}.", ""]
            continue
        cols = ["kind", "rank", "train_index", "gold"] + [f"{m}:rank" for m in scores] + [f"{m}:agrees" for m in scores]
        views = {int(j): data.describe("train", int(j)) for j in sub.train_index}
        if regression:
            train_rows = [int(j) for j in sub.train_index]
            test_pred = predict("test", [test_idx[p]])[0]
            preds = dict(zip(train_rows, predict("train", train_rows)))
            lines += [f"## Test instance {test_idx[p]} (target {_target(data, test_view['label']):.4g}, prediction "
                      f"{_target(data, test_pred):.4g})", ""]
            label_cols = ["target", "prediction"]
            labels = {j: [_target(data, views[j]["label"]), _target(data, preds[j])] for j in train_rows}
        else:
            lines += [f"## Test instance {test_idx[p]} (label {test_view.get('label')})", ""]
            label_cols = ["label"]
            labels = {int(j): [views[int(j)].get("label")] for j in sub.train_index}
        if data.modality == "text":
            lines += [f"> {md_escape(str(test_view.get('text', '')))}", ""]
            rows = [list(r[c] for c in cols) + labels[int(r.train_index)]
                    + [md_escape(str(views[int(r.train_index)].get("text", "")))] for _, r in sub.iterrows()]
            lines += md_table(cols + label_cols + ["text"], rows)
        else:
            rows = [[r[c] for c in cols] + labels[int(r.train_index)] for _, r in sub.iterrows()]
            lines += md_table(cols + label_cols, rows)
            if data.modality == "image":
                fig = _image_strip(data, sub, views, test_idx[p], test_view, out)
                figs.append(fig)
                lines += ["", f"![examples of test {test_idx[p]}]({fig.name})"]
            else:
                lines += ["", "Features (missing = 0):", ""] + _feature_table(sub, views, test_view)
        lines.append("")
    return table, "\n".join(lines), figs, overlap


def _regression_note(data: DataBundle) -> str:
    if "target_mean" in data.info and "target_std" in data.info:
        return (f"Targets and the final model's predictions in the target's original units (the model predicts the "
                f"standardised target; × {data.info['target_std']:.4g} + {data.info['target_mean']:.4g}).")
    return "Targets and the final model's predictions in the units the model was trained on."


def _target(data: DataBundle, value: float) -> float:
    """A regression target or prediction in the target's original units where the loader
    recorded its standardisation (info `target_mean`, `target_std`), else as the model sees it."""
    return float(value) * data.info.get("target_std", 1.0) + data.info.get("target_mean", 0.0)


def _predictor(node: DictConfig, data: DataBundle, final_weights: dict[str, torch.Tensor]
               ) -> Callable[[str, list[int]], list[float]]:
    """predict(split, rows) -> the final model's output (one per instance: regression) for
    those rows of that split; `node`: the model's config node."""
    model = build(node, key="model", input_shape=list(data.input_shape), n_outputs=data.n_outputs)
    model.load_state_dict(final_weights)
    model.eval()
    dtype = next(model.parameters()).dtype
    tensors = {split: data.tensors(split)[0] for split in ("train", "test")}

    def predict(split: str, rows: list[int]) -> list[float]:
        x = tensors[split][torch.tensor(rows, dtype=torch.long)]
        with torch.no_grad():
            out = model(x.to(dtype) if x.is_floating_point() else x)
        return out.reshape(len(rows)).double().tolist()
    return predict


def _image_strip(data, sub: pd.DataFrame, views: dict[int, dict], test_index: int, test_view: dict, out: Path) -> Path:
    """`examples_test<i>.png`: the test image, then the helpful and the harmful left-out images."""
    def picture(split: str, index: int, view: dict):
        return _image(data, split, index, view)

    def caption(r) -> str:
        return f"#{int(r.train_index)} y={views[int(r.train_index)].get('label')} {r.gold:.2g}"

    helpful, harmful = ([(picture("train", int(r.train_index), views[int(r.train_index)]), caption(r))
                         for _, r in sub[sub.kind == kind].iterrows()] for kind in ("helpful", "harmful"))
    test_caption = f"#{test_index} y={test_view.get('label')}"
    return plots.plot_image_examples((picture("test", test_index, test_view), test_caption), helpful, harmful,
                                     out / f"examples_test{test_index}.png")


def _feature_table(sub: pd.DataFrame, views: dict[int, dict], test_view: dict) -> list[str]:
    """Tabular data: features as rows, instances as columns, so names and values read side by side."""
    order = [("test", test_view)] + [(f"{'+' if r.kind == 'helpful' else '−'}{int(r['rank'])} #{int(r.train_index)}",
                                      views[int(r.train_index)]) for _, r in sub.iterrows()]
    feats = [f for f in dict.fromkeys(k for _, v in order for k in v) if f != "label"]
    return md_table(["feature"] + [n for n, _ in order], [[f] + [_fmt(v.get(f, "")) for _, v in order] for f in feats])


def _image(data, split: str, index: int, view: dict):
    """The instance's picture: the dataset's own view, else its tensor [C, H, W] scaled to [0, 1] as [H, W(, C)]."""
    im = view.get("image")
    if im is not None:
        return im
    x, _ = data.tensors(split)
    arr = x[int(index)].float()
    arr = arr.permute(1, 2, 0) if arr.ndim == 3 else arr  # [C, H, W] -> [H, W, C]
    arr = arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr
    lo, hi = float(arr.min()), float(arr.max())
    return ((arr - lo) / (hi - lo if hi > lo else 1.0)).numpy()


def _overlap(v: float) -> str:
    return "undefined" if v != v else f"{v:.2f}"  # NaN: every test instance's top k is undefined (said below)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return md_escape(str(v))
