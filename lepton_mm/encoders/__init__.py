"""Encoders, one per modality, each returning ``lepton_mm.EncoderOutput``.

- ``ImageCNN``: images ``[batch, height, width, channels]`` → feature-map cells as tokens.
- ``AudioSpectrogramCNN``: log-mel ``[batch, time, n_mels]`` + mask → frames as tokens.
- ``TextTransformer``: BERT-compatible; token ids ``int32 [batch, time]`` + mask.
- ``RecurrentEncoder``: GRU/LSTM, uni- or bidirectional, frames ``[batch, time, features]``.
- ``RecurrentTextEncoder``: token ids ``int32 [batch, time]`` + mask → embeddings → GRU/LSTM.
"""

from lepton_mm.encoders.audio_cnn import AudioSpectrogramCNN
from lepton_mm.encoders.image_cnn import ImageCNN
from lepton_mm.encoders.recurrent import RecurrentEncoder, RecurrentTextEncoder
from lepton_mm.encoders.text_transformer import TextTransformer

__all__ = ["AudioSpectrogramCNN", "ImageCNN", "RecurrentEncoder", "RecurrentTextEncoder",
           "TextTransformer"]
