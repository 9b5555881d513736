"""GLUE SST-2: the hub dataset `stanfordnlp/sst2` through `datasets` when online, or local
parquet files in the same schema (`train.parquet`, `validation.parquet`; `idx`, `sentence`,
`label`) through `dataset.root=` or `$TDA_DATA_DIR/sst2`. As in the paper, the validation
split (872 sentences) plays the test role: GLUE's test labels are hidden.

x = token ids [L] from the MODEL's tokenizer (`tokenizer`, interpolated from `model.encoder`
in conf/dataset/sst2.yaml), truncated to `max_length` (128 in the paper) and padded with the
pad id to L = the longest tokenised sentence in either split (at most `max_length`).
Tokenisation is a `datasets.map`, so it is cached by `datasets` (HF_DATASETS_CACHE).
"""

from __future__ import annotations

import numpy as np

from tda.data.base import DataBundle, subsample
from tda.data.hub import load_splits
from tda.extras import requires_extra
from tda.pretrained import load_tokenizer


@requires_extra("text")
def sst2(root: str | None = None, tokenizer: str = "minilm", tokenizer_path: str | None = None,
         max_length: int = 128, max_train: int | None = None, max_test: int | None = None,
         subsample_seed: int = 0) -> DataBundle:
    raw = load_splits("sst2", "stanfordnlp/sst2", {"train": "train", "test": "validation"}, root)
    tok = load_tokenizer(tokenizer, tokenizer_path)
    pad_id = int(tok.pad_token_id)

    def tokenise(batch):
        ids = tok(batch["sentence"], truncation=True, max_length=max_length)["input_ids"]
        return {"ids": ids, "n_tokens": [len(i) for i in ids]}

    splits = {}
    for split, n, seed in (("train", max_train, subsample_seed), ("test", max_test, subsample_seed + 1)):
        ds = subsample(raw[split], n, seed)
        splits[split] = ds.map(tokenise, batched=True, desc=f"sst2 {split}: tokenise ({tokenizer})")
    length = max(max(splits[s]["n_tokens"]) for s in splits)

    def pad(batch):
        x = np.full((len(batch["ids"]), length), pad_id, dtype=np.int64)
        for i, ids in enumerate(batch["ids"]):
            x[i, :len(ids)] = ids
        return {"x": x, "y": np.asarray(batch["label"], np.int64), "text": batch["sentence"]}

    for split, ds in splits.items():
        splits[split] = ds.map(pad, batched=True, remove_columns=ds.column_names, desc=f"sst2 {split}: pad to {length}")
    return DataBundle(name="sst2", train=splits["train"], test=splits["test"], task="classification", n_outputs=2,
                      modality="text", class_names=["negative", "positive"],
                      info={"source": "stanfordnlp/sst2 (GLUE); test role = validation split", "tokenizer": tokenizer,
                            "max_length": int(max_length), "padded_length": int(length), "pad_id": pad_id})
