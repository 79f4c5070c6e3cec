"""Pure JAX feature front ends: a librosa-compatible log-mel spectrogram and its masks."""

from lepton_mm.features.log_mel import (
    frame_mask,
    log_mel_spectrogram,
    mel_filterbank,
    num_frames,
)

__all__ = ["frame_mask", "log_mel_spectrogram", "mel_filterbank", "num_frames"]
