"""Tests for lepton_mm.features.log_mel: librosa parity on FSDD, masks, bad inputs."""

import doctest
import functools
import pathlib
import warnings

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest

from lepton_mm.features import frame_mask, log_mel_spectrogram, mel_filterbank, num_frames
from lepton_mm.features import log_mel as log_mel_module

FSDD = pathlib.Path(__file__).resolve().parents[1] / "data" / "fsdd.npz"
TOLERANCE_DB = 0.05
DYNAMIC_RANGE_DB = 80.0

# (sample_rate, keyword arguments); 16 kHz reuses the 8 kHz recordings as if 16 kHz.
CONFIGS = [
    (8000, dict(n_fft=256, hop_length=64, n_mels=40)),
    (8000, dict(n_fft=512, hop_length=128, n_mels=64)),
    (16000, dict(n_fft=1024, hop_length=256, n_mels=128, fmin=50.0, fmax=7000.0)),
    (8000, dict(n_fft=512, hop_length=100, n_mels=64, fmin=20.0, fmax=3800.0)),
]


@functools.cache
def _jitted(sample_rate, **kwargs):
    return jax.jit(functools.partial(log_mel_spectrogram, sample_rate=sample_rate, **kwargs))


def _librosa_log_mel(y, sample_rate, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_fft too large" and empty-filter warnings.
        mel = librosa.feature.melspectrogram(y=y, sr=sample_rate, **kwargs)
    return librosa.power_to_db(mel, top_db=None).T


def _max_db_error(ours, ref):
    """Max |ours - ref| over bins within DYNAMIC_RANGE_DB of the clip's maximum."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert np.all(np.isfinite(ours))
    loud = ref >= ref.max() - DYNAMIC_RANGE_DB
    return float(np.abs(ours - ref)[loud].max())


@pytest.fixture(scope="module")
def recordings():
    """20 FSDD recordings (float32 in [-1, 1]), varied lengths, odd ones included."""
    data = np.load(FSDD)
    audio, offsets = data["audio"], data["offsets"]
    ids = np.random.default_rng(0).choice(len(offsets) - 1, 19, replace=False)
    clips = [audio[offsets[i]:offsets[i + 1]].astype(np.float32) / 32768 for i in ids]
    clips.append(clips[0][:4001])  # A crop of odd length, not a multiple of any hop.
    assert any(len(c) % 2 for c in clips[:-1])
    return clips


# ---------------------------------------------------------------------------- filterbank


@pytest.mark.parametrize("sample_rate,kwargs", [
    (8000, dict(n_fft=256, n_mels=40)),
    (8000, dict(n_fft=512, n_mels=64)),
    (16000, dict(n_fft=1024, n_mels=128, fmin=50.0, fmax=7000.0)),
    (22050, dict(n_fft=2048, n_mels=128, fmin=300.0)),
    (44100, dict(n_fft=400, n_mels=23, fmax=11025)),
])
def test_mel_filterbank_matches_librosa(sample_rate, kwargs):
    ours = mel_filterbank(sample_rate=sample_rate, **kwargs)
    ref = librosa.filters.mel(sr=sample_rate, **kwargs).T
    assert ours.shape == ref.shape == (kwargs["n_fft"] // 2 + 1, kwargs["n_mels"])
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)


def test_mel_filterbank_is_cached_and_read_only():
    a = mel_filterbank(sample_rate=8000, n_fft=512, n_mels=64)
    b = mel_filterbank(sample_rate=8000, n_fft=512, n_mels=64, fmin=0.0, fmax=4000.0)
    assert a is b
    with pytest.raises(ValueError, match="read-only"):
        a[0, 0] = 1.0


def test_empty_mel_filters_warn_and_read_minus_100_db():
    # 62.5 Hz FFT bins are too coarse for 128 bands below 4 kHz (librosa warns too).
    with pytest.warns(UserWarning, match="empty"):
        weights = mel_filterbank(sample_rate=8000, n_fft=128, n_mels=128)
    empty = ~(weights.max(axis=0) > 0)
    assert empty.any()
    with pytest.warns(UserWarning, match="empty"):
        out = log_mel_spectrogram(jnp.ones(512), 8000, n_fft=128, hop_length=64, n_mels=128)
    np.testing.assert_array_equal(np.asarray(out)[:, empty], -100.0)


# ------------------------------------------------------------------------ librosa parity


@pytest.mark.parametrize("sample_rate,kwargs", CONFIGS)
def test_parity_with_librosa_on_fsdd(recordings, sample_rate, kwargs):
    f = _jitted(sample_rate, **kwargs)
    errors = []
    for y in recordings:
        ours = f(y)
        assert ours.shape == (1 + len(y) // kwargs["hop_length"], kwargs["n_mels"])
        errors.append(_max_db_error(ours, _librosa_log_mel(y, sample_rate, **kwargs)))
    assert max(errors) < TOLERANCE_DB, errors


@pytest.mark.parametrize("length", [1, 7, 100, 255, 511, 513])
def test_short_clips_match_librosa_and_are_finite(recordings, length):
    y = recordings[1][2000:2000 + length]
    ours = log_mel_spectrogram(y, 8000)  # Eager (no jit) also works.
    assert ours.shape == (1 + length // 128, 64)
    ref = _librosa_log_mel(y, 8000, n_fft=512, hop_length=128, n_mels=64)
    assert _max_db_error(ours, ref) < TOLERANCE_DB


def test_silence_is_minus_100_db():
    out = log_mel_spectrogram(jnp.zeros((2, 1001)), 8000)
    assert out.shape == (2, 8, 64)
    np.testing.assert_array_equal(np.asarray(out), -100.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, np.float64])
def test_other_float_dtypes_give_float32(recordings, dtype):
    y = recordings[2][:3000]
    out = log_mel_spectrogram(np.asarray(y).astype(dtype), 8000)
    assert out.dtype == jnp.float32 and out.shape == (24, 64)
    assert np.all(np.isfinite(np.asarray(out)))


# ---------------------------------------------------------------------- batching / vmap


def test_vmap_and_batch_axes_equal_per_clip(recordings):
    batch = np.stack([y[:3001] for y in recordings[:4]])  # [4, 3001]
    f = _jitted(8000, n_fft=512, hop_length=128, n_mels=64)
    per_clip = np.stack([np.asarray(f(y)) for y in batch])
    np.testing.assert_allclose(np.asarray(jax.vmap(f)(batch)), per_clip, atol=1e-4)
    np.testing.assert_allclose(np.asarray(f(batch)), per_clip, atol=1e-4)


def test_batch_channels_samples_input(recordings):
    x = np.stack([y[:2500] for y in recordings[:6]]).reshape(2, 3, 2500)
    out = np.asarray(log_mel_spectrogram(x, 8000, n_mels=40))
    assert out.shape == (2, 3, 1 + 2500 // 128, 40)
    for b in range(2):
        for c in range(3):
            np.testing.assert_allclose(
                out[b, c], np.asarray(log_mel_spectrogram(x[b, c], 8000, n_mels=40)), atol=1e-4)


# ----------------------------------------------------------------------------- masking


def test_num_frames():
    assert num_frames(8000, hop_length=128) == 63
    assert num_frames(1, hop_length=128) == 1
    assert num_frames(256, hop_length=128) == 3
    with pytest.raises(ValueError, match="hop_length"):
        num_frames(100, hop_length=0)


def test_frame_mask_hand_computed():
    # n_fft=8, hop=4: frame t covers samples [4t - 4, 4t + 4); 16 samples -> 5 frames.
    # Frame 0: [-4, 4), 1: [0, 8), 2: [4, 12), 3: [8, 16), 4: [12, 20).
    lengths = jnp.array([0, 1, 4, 5, 8, 9, 16, 99])
    mask = frame_mask(lengths, 16, n_fft=8, hop_length=4)
    expected = [
        [0, 0, 0, 0, 0],  # Length 0: nothing is real.
        [1, 1, 0, 0, 0],  # Sample 0 lies in frames 0 and 1.
        [1, 1, 0, 0, 0],  # Samples 0-3: frame 2 starts at 4.
        [1, 1, 1, 0, 0],  # Sample 4 reaches frame 2.
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],  # Sample 8 reaches frame 3.
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],  # Longer than num_samples: clipped.
    ]
    assert mask.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(mask).astype(int), expected)


def test_frame_mask_defaults():
    # t * 128 - 256 < 1000  <=>  t <= 9: 10 of 63 frames.
    mask = np.asarray(frame_mask(jnp.array([1000, 8000]), 8000))
    assert mask.shape == (2, 63)
    assert mask[0].sum() == 10 and mask[0, :10].all()
    assert mask[1].all()


def test_frame_mask_under_jit():
    f = jax.jit(frame_mask, static_argnums=1, static_argnames=("n_fft", "hop_length"))
    np.testing.assert_array_equal(
        f(jnp.array([5]), 16, n_fft=8, hop_length=4), [[True, True, True, False, False]])


_PROPERTY_SAMPLES = 700


@hypothesis.settings(max_examples=30, deadline=None, derandomize=True, database=None)
@hypothesis.given(
    params=st.sampled_from([(64, 16), (128, 32), (96, 40), (32, 32)]),
    length=st.integers(0, _PROPERTY_SAMPLES),
    seed=st.integers(0, 2**31 - 1),
)
def test_frame_mask_property(params, length, seed):
    """Invalid frames see only padding; frames clear of padding ignore its values."""
    n_fft, hop = params
    f = _jitted(8000, n_fft=n_fft, hop_length=hop, n_mels=16)
    rng = np.random.default_rng(seed)
    real = rng.uniform(-1, 1, _PROPERTY_SAMPLES).astype(np.float32)
    pad_a = rng.uniform(-1, 1, _PROPERTY_SAMPLES).astype(np.float32)
    pad_b = rng.uniform(-1, 1, _PROPERTY_SAMPLES).astype(np.float32)
    other_real = rng.uniform(-1, 1, _PROPERTY_SAMPLES).astype(np.float32)
    is_real = np.arange(_PROPERTY_SAMPLES) < length

    base = np.asarray(f(np.where(is_real, real, pad_a)))
    new_padding = np.asarray(f(np.where(is_real, real, pad_b)))
    new_real = np.asarray(f(np.where(is_real, other_real, pad_a)))
    zero_padded = np.asarray(f(np.where(is_real, real, 0.0)))

    mask = np.asarray(frame_mask(jnp.array([length]), _PROPERTY_SAMPLES,
                                 n_fft=n_fft, hop_length=hop))[0]
    t = np.arange(mask.shape[0])
    # Changing the real samples changes nothing in frames the mask calls invalid.
    np.testing.assert_allclose(new_real[~mask], base[~mask], atol=1e-4)
    # Invalid frames of zero-padded audio read exactly silence.
    np.testing.assert_array_equal(zero_padded[~mask], -100.0)
    # Changing the padding changes nothing in frames whose window ends within the real
    # samples (window [t * hop - n_fft // 2, t * hop + n_fft // 2)).
    clear = t * hop + n_fft // 2 <= length
    np.testing.assert_allclose(new_padding[clear], base[clear], atol=1e-4)
    # The mask is tight: every frame whose window gives a real sample nonzero weight
    # (the periodic Hann window's first tap is 0) is valid and does change.
    starts = t * hop - n_fft // 2
    sees_real = np.maximum(starts + 1, 0) < length
    assert np.all(mask[sees_real])
    assert np.all(np.abs(new_real - base).max(axis=-1)[sees_real] > 1e-6)
    # Valid frames form a prefix.
    assert np.all(np.diff(mask.astype(int)) <= 0)


# -------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("waveform,kwargs,error,match", [
    (np.zeros(800, np.int16), {}, TypeError, r"waveform.*\[-1, 1\]"),
    (jnp.zeros(800, jnp.int32), {}, TypeError, "waveform"),
    (np.zeros(800, bool), {}, TypeError, "waveform"),
    ([0.0] * 800, {}, TypeError, "waveform"),
    (np.float32(0.5), {}, ValueError, "waveform.*rank"),
    (np.zeros((2, 0), np.float32), {}, ValueError, "waveform.*empty"),
    (np.zeros(800, np.float32), dict(fmax=5000.0), ValueError, "fmax.*Nyquist"),
    (np.zeros(800, np.float32), dict(fmin=-1.0), ValueError, "fmin"),
    (np.zeros(800, np.float32), dict(fmin=3000.0, fmax=2000.0), ValueError, "fmin"),
    (np.zeros(800, np.float32), dict(hop_length=-128), ValueError, "hop_length"),
    (np.zeros(800, np.float32), dict(hop_length=1.5), ValueError, "hop_length"),
    (np.zeros(800, np.float32), dict(n_fft=0), ValueError, "n_fft"),
    (np.zeros(800, np.float32), dict(n_fft=511), ValueError, "n_fft.*even"),
    (np.zeros(800, np.float32), dict(n_mels=0), ValueError, "n_mels"),
    (np.zeros(800, np.float32), dict(sample_rate=0), ValueError, "sample_rate"),
    (np.zeros(800, np.float32), dict(sample_rate=-8000), ValueError, "sample_rate"),
])
def test_bad_inputs_raise_naming_the_argument(waveform, kwargs, error, match):
    kwargs = {"sample_rate": 8000, **kwargs}
    sample_rate = kwargs.pop("sample_rate")
    with pytest.raises(error, match=match):
        log_mel_spectrogram(waveform, sample_rate, **kwargs)


def test_bad_inputs_raise_under_jit():
    f = _jitted(8000, n_fft=512, hop_length=128, n_mels=64)
    with pytest.raises(TypeError, match="waveform"):
        f(jnp.zeros(800, jnp.int16))


@pytest.mark.parametrize("lengths,num_samples,kwargs,error,match", [
    (jnp.array([1.0]), 16, {}, TypeError, "lengths"),
    (jnp.array([[1]]), 16, {}, ValueError, "lengths"),
    (jnp.array([1]), 0, {}, ValueError, "num_samples"),
    (jnp.array([1]), 16, dict(hop_length=0), ValueError, "hop_length"),
    (jnp.array([1]), 16, dict(n_fft=7), ValueError, "n_fft"),
])
def test_frame_mask_bad_inputs(lengths, num_samples, kwargs, error, match):
    with pytest.raises(error, match=match):
        frame_mask(lengths, num_samples, **kwargs)


def test_docstring_examples():
    results = doctest.testmod(log_mel_module, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0
