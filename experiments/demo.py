"""Encode bundled images, audio and text with lepton_mm's three encoders.

The Quickstart's main job until the AV-MNIST experiment lands: it loads real MNIST digits,
Free Spoken Digit recordings and MUStARD utterances from ``data/``, runs each modality's
encoder (randomly initialised CNNs, the pretrained all-MiniLM-L6-v2 text encoder) and
prints the ``EncoderOutput`` shapes, compile time and throughput.

    python experiments/demo.py [--num-examples 256] [--seed 0]
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lepton_mm import cli
from lepton_mm.data import load_fsdd, load_mnist, load_mustard
from lepton_mm.encoders import AudioSpectrogramCNN, ImageCNN
from lepton_mm.features import frame_mask, log_mel_spectrogram
from lepton_mm.pretrained import SentenceEncoder

CLIP_SAMPLES = 8000  # one second at FSDD's 8 kHz


def _timed(fn, *args, repeats: int = 5):
    """Returns (output, first-call seconds, median seconds of later calls)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return out, first, float(np.median(times))


def _pad_clips(waveforms, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads or crops clips to ``length``; returns float32 [n, length] and lengths."""
    batch = np.zeros((len(waveforms), length), np.float32)
    lengths = np.zeros(len(waveforms), np.int32)
    for i, w in enumerate(waveforms):
        n = min(len(w), length)
        batch[i, :n] = w[:n]
        lengths[i] = n
    return batch, lengths


def _row(name: str, shape_desc: str, first: float, steady: float, n: int) -> str:
    return f"{name:<22}{shape_desc:<44}{first:>9.2f} s{n / steady:>12.0f} /s"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What the demo encodes.

    Attributes:
      num_examples: examples per modality (at least 1).
      seed: initialises the randomly initialised encoders (at least 0).
    """

    num_examples: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name, minimum in (("num_examples", 1), ("seed", 0)):
            if getattr(self, name) < minimum:
                raise ValueError(f"{name}: expected an integer >= {minimum}, got "
                                 f"{getattr(self, name)}.")


def parse_args(argv: list[str] | None = None) -> DemoConfig:
    """Command line → ``DemoConfig`` (a bad flag or value: one line, exit status 2)."""
    parser = cli.script_parser(__doc__)
    flags = cli.config_flags(DemoConfig)
    cli.add_flags(parser, DemoConfig, flags)
    return cli.make_config(parser, DemoConfig,
                           cli.flag_overrides(parser.parse_args(argv), flags))


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    n = config.num_examples
    rngs = nnx.Rngs(config.seed)

    print(f"lepton_mm demo on {jax.devices()[0].platform.upper()} "
          f"({jax.device_count()} device(s)), {n} examples per modality\n")
    print(f"{'step':<22}{'output':<44}{'compile+run':>11}{'throughput':>14}")

    # Images: MNIST test digits through the MultiBench AV-MNIST LeNet.
    mnist = load_mnist()
    images = jnp.asarray(mnist.x_test[:n, :, :, None], jnp.float32) / 255.0
    image_encoder = ImageCNN.lenet(rngs=rngs)
    image_encoder.eval()
    encode_images = nnx.jit(lambda m, x: m(x))
    out, first, steady = _timed(encode_images, image_encoder, images)
    print(_row("ImageCNN.lenet", f"tokens {out.tokens.shape} pooled {out.pooled.shape}",
               first, steady, n))

    # Audio: FSDD test recordings -> log-mel (jit + vmap) -> spectrogram CNN.
    fsdd = load_fsdd()
    idx = np.flatnonzero(fsdd.is_test)[:n]
    clips, lengths = _pad_clips([fsdd.waveforms[i] for i in idx], CLIP_SAMPLES)
    mel_fn = jax.jit(jax.vmap(lambda w: log_mel_spectrogram(
        w, fsdd.sample_rate, n_fft=256, hop_length=64, n_mels=64)))
    log_mel, first, steady = _timed(mel_fn, jnp.asarray(clips))
    print(_row("log_mel_spectrogram", f"{log_mel.shape} dB", first, steady, len(idx)))
    mask = frame_mask(jnp.asarray(lengths), CLIP_SAMPLES, n_fft=256, hop_length=64)
    audio_encoder = AudioSpectrogramCNN(64, dim=128, rngs=rngs)
    audio_encoder.eval()
    encode_audio = nnx.jit(lambda m, x, k: m(x, k))
    out, first, steady = _timed(encode_audio, audio_encoder, log_mel, mask)
    print(_row("AudioSpectrogramCNN", f"tokens {out.tokens.shape} pooled {out.pooled.shape}",
               first, steady, len(idx)))

    # Text: MUStARD utterances through pretrained all-MiniLM-L6-v2.
    mustard = load_mustard()
    texts = mustard.utterances[:n]
    start = time.perf_counter()
    encoder = SentenceEncoder.from_pretrained()
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    emb = encoder.encode(texts)
    first = time.perf_counter() - start
    start = time.perf_counter()
    encoder.encode(texts)
    steady = time.perf_counter() - start
    print(_row("SentenceEncoder", f"embeddings {emb.shape} (loaded in {load_s:.1f} s)",
               first, steady, len(texts)))

    sims = emb @ emb.T
    np.fill_diagonal(sims, -1.0)
    i, j = np.unravel_index(np.argmax(sims), sims.shape)
    print(f"\nmost similar pair of utterances (cosine {sims[i, j]:.3f}):\n"
          f"  {texts[i]!r}\n  {texts[j]!r}")


if __name__ == "__main__":
    main()
