"""Noise-robust AV-MNIST training: ``SNRRangeDataset`` (audio rebuilt every epoch at SNRs
drawn per example) and per-utterance log-mel standardisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _sources import CrashAfter
from flax import nnx

from lepton_mm.data import (
    ArrayDataset,
    SNRRangeDataset,
    load_avmnist,
    normalize_log_mel,
    standardize_utterances,
)
from lepton_mm.models import Classification, build_classifier
from lepton_mm.training import Checkpointer, fit, seed_rngs
from lepton_mm.types import EncoderOutput

LOW, HIGH = -20.0, 20.0


@pytest.fixture(scope="module")
def train():
    """The first 24 training examples (3 batches of 8)."""
    return load_avmnist(data_seed=0).train.subset(np.arange(24))


def test_snr_draw_is_keyed_by_seed_epoch_and_example(train):
    source = SNRRangeDataset(train, (LOW, HIGH))
    rows = np.arange(len(train))
    snr = source.snr(rows, seed=0, epoch=0)
    assert snr.dtype == np.float32 and snr.shape == (24,)
    assert np.all((snr >= LOW) & (snr <= HIGH)) and snr.std() > 5  # spread over the range
    # Deterministic, and the same whatever batch (or subset) an example is drawn in.
    np.testing.assert_array_equal(source.snr(rows, seed=0, epoch=0), snr)
    np.testing.assert_array_equal(source.snr(np.array([7, 3]), seed=0, epoch=0), snr[[7, 3]])
    alone = SNRRangeDataset(train.subset(np.array([5])), (LOW, HIGH))
    assert alone.snr([0], seed=0, epoch=0)[0] == snr[5]
    # Another epoch or seed: other draws (and other noise).
    for other in (source.snr(rows, seed=0, epoch=1), source.snr(rows, seed=1, epoch=0)):
        assert np.all(other != snr)
    a, b = (source.waveforms([2], seed=0, epoch=e) for e in (0, 1))
    np.testing.assert_array_equal(a.clean, b.clean)
    noise_a, noise_b = a.noisy - a.clean, b.noisy - b.clean
    assert not np.allclose(noise_a / noise_a.std(), noise_b / noise_b.std(), atol=0.1)
    # A degenerate range is one SNR, with fresh noise every epoch.
    fixed = SNRRangeDataset(train, (-15.0, -15.0))
    np.testing.assert_array_equal(fixed.snr(rows, seed=3, epoch=2), np.float32(-15.0))


def test_noise_power_matches_the_drawn_snr(train):
    """Hand check of the documented derivation: the noise of example i at (seed s, epoch
    e) is rms * 10 ** (-snr / 20) * normal(fold_in(k, 1)) on the clip's samples, k =
    fold_in(fold_in(fold_in(fold_in(fold_in(key(data_seed), split), i), 2), s), e)."""
    source = SNRRangeDataset(train, (LOW, HIGH))
    rows = np.array([0, 9])
    seed, epoch = 4, 3
    snr = source.snr(rows, seed=seed, epoch=epoch)
    w = source.waveforms(rows, seed=seed, epoch=epoch)
    for j, i in enumerate(train.example_index[rows]):
        s, n = int(w.start[j]), int(w.length[j])
        clip = w.clean[j, s:s + n].astype(np.float64)
        noise = (w.noisy[j] - w.clean[j]).astype(np.float64)
        assert not np.any(w.noisy[j, :s]) and not np.any(w.noisy[j, s + n:])  # padding
        # The noise's RMS over the clip is the clip's RMS lowered by the drawn SNR.
        measured = 20 * np.log10(np.sqrt(np.mean(clip ** 2))
                                 / np.sqrt(np.mean(noise[s:s + n] ** 2)))
        # (the estimate's spread is ~6 / sqrt(n) dB: allow four of it)
        assert measured == pytest.approx(float(snr[j]), abs=25 / np.sqrt(n))
        k = jax.random.key(0)
        for data in (0, int(i), 2, seed, epoch):  # split 0 = train, tag 2
            k = jax.random.fold_in(k, data)
        drawn = jax.random.uniform(jax.random.fold_in(k, 0), (), jnp.float32, LOW, HIGH)
        assert float(drawn) == snr[j]
        sigma = np.sqrt(np.mean(clip ** 2)) * 10 ** (-float(snr[j]) / 20)
        expected = sigma * np.asarray(jax.random.normal(jax.random.fold_in(k, 1), (8000,)))
        np.testing.assert_allclose(noise[s:s + n], expected[s:s + n], rtol=1e-4,
                                   atol=1e-5 * sigma)


def test_batches_follow_array_dataset_order_and_restart_mid_epoch(train):
    stats = (np.float32(-40.0), np.float32(20.0))
    source = SNRRangeDataset(train, (LOW, HIGH), normalize=stats)
    reference = ArrayDataset({"label": train.labels, "image": train.images(slice(None))})
    assert len(source) == 24 and source.num_batches(10) == 3
    epoch = list(source.batches(10, seed=1, epoch=2))
    for got, want in zip(epoch, reference.batches(10, seed=1, epoch=2), strict=True):
        np.testing.assert_array_equal(got["label"], want["label"])
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["valid"], want["valid"])
    assert epoch[-1]["valid"].tolist() == [True] * 4 + [False] * 6
    # Resuming mid-epoch gives the same batches; the audio is that of audio().
    later = list(source.batches(10, seed=1, epoch=2, start=1))
    np.testing.assert_array_equal(later[0]["audio"][0], epoch[1]["audio"][0])
    order = reference.batch_indices(10, seed=1, epoch=2)[1][0]
    log_mel, mask = source.audio(order, seed=1, epoch=2)
    np.testing.assert_array_equal(log_mel, epoch[1]["audio"][0])
    np.testing.assert_array_equal(mask, train.audio(order)[1])  # the clips' frames
    raw = SNRRangeDataset(train, (LOW, HIGH)).audio(order, seed=1, epoch=2)[0]
    np.testing.assert_allclose(log_mel, (raw - stats[0]) / stats[1], rtol=1e-6, atol=1e-6)
    # Another epoch: other audio, same examples.
    again = next(source.batches(10, seed=1, epoch=3, shuffle=False))
    first = next(source.batches(10, seed=1, epoch=2, shuffle=False))
    np.testing.assert_array_equal(again["label"], first["label"])
    assert not np.allclose(again["audio"][0], first["audio"][0])
    # Rows of a batch (one process's share) are those rows of the whole batch (the
    # log-mel of another batch size may differ in the last float32 bits).
    part = next(source.batches(10, seed=1, epoch=2, rows=slice(5, 10)))
    np.testing.assert_array_equal(part["label"], epoch[0]["label"][5:])
    np.testing.assert_allclose(part["audio"][0], epoch[0]["audio"][0][5:], atol=1e-4)


def test_standardize_utterances_over_valid_frames_only():
    rng = np.random.default_rng(0)
    log_mel = (rng.normal(size=(5, 9, 4)) * rng.uniform(1, 30, (5, 1, 1))
               + rng.uniform(-80, 0, (5, 1, 1))).astype(np.float32)
    mask = rng.random((5, 9)) < 0.6
    mask[3] = False  # no valid frame: unchanged
    log_mel[4][mask[4]] = -7.0  # constant valid frames: centred only
    mask[0] = True
    x = log_mel.copy()
    standardize_utterances(x, mask, chunk=2)  # several chunks
    for i in range(3):
        valid = x[i][mask[i]].astype(np.float64)
        assert valid.mean() == pytest.approx(0.0, abs=1e-5)
        assert valid.std() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_array_equal(x[i][~mask[i]], log_mel[i][~mask[i]])  # padding
        want = (log_mel[i] - log_mel[i][mask[i]].mean()) / log_mel[i][mask[i]].std()
        np.testing.assert_allclose(x[i][mask[i]], want[mask[i]], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(x[3], log_mel[3])
    np.testing.assert_array_equal(x[4][mask[4]], 0.0)
    np.testing.assert_array_equal(x[4][~mask[4]], log_mel[4][~mask[4]])
    y = log_mel.copy()
    normalize_log_mel(y, mask, "utterance")
    np.testing.assert_array_equal(y, x)
    with pytest.raises(ValueError, match="how"):
        normalize_log_mel(y, mask, "global")
    with pytest.raises(ValueError, match="mask"):
        standardize_utterances(y, mask[:, :4])


def test_bad_snr_ranges_are_rejected_naming_the_argument(train):
    from lepton_mm.recipes.avmnist import AVMNISTConfig

    for bad in ((5.0, -5.0), (float("nan"), 3.0), (-5.0, float("inf"))):
        with pytest.raises(ValueError, match=r"^snr_db: .*low <= high"):
            SNRRangeDataset(train, bad)
        with pytest.raises(ValueError, match=r"^train_snr_db: .*low <= high"):
            AVMNISTConfig(train_snr_db=bad)
    for bad in ((1.0,), (1.0, 2.0, 3.0), "ab", 3.0):
        with pytest.raises((TypeError, ValueError), match=r"^snr_db: "):
            SNRRangeDataset(train, bad)
        with pytest.raises(ValueError, match=r"^train_snr_db: "):
            AVMNISTConfig(train_snr_db=bad)
    with pytest.raises(ValueError, match="normalize"):
        SNRRangeDataset(train, (0.0, 1.0), normalize="split")
    assert AVMNISTConfig(train_snr_db=[-20, 20]).train_snr_db == (-20.0, 20.0)


class MelFrames(nnx.Module):
    """A tiny audio encoder: one linear layer per frame."""

    def __init__(self, rngs):
        self.dim = 6
        self.proj = nnx.Linear(64, 6, rngs=rngs)

    def __call__(self, log_mel, mask):
        return EncoderOutput.from_tokens(jnp.tanh(self.proj(log_mel)), mask)


def test_fit_over_the_source_resumes_exactly(train, tmp_path):
    def model():
        rngs = seed_rngs(0)
        return build_classifier({"audio": MelFrames(rngs)}, None, num_outputs=10, rngs=rngs)

    def params(m):
        return [np.asarray(x) for x in jax.tree.leaves(nnx.as_pure(nnx.state(m, nnx.Param)))]

    source = SNRRangeDataset(train, (LOW, HIGH), normalize="utterance")
    val = train.subset(np.arange(8)).materialize()
    kw = {"eval_data": val, "epochs": 2, "batch_size": 8, "seed": 5, "checkpoint_every": 2,
          "progress": False}
    reference = model()
    done = fit(reference, Classification(10), source, workdir=tmp_path / "ref", **kw)
    assert done.step == 6 and np.isfinite(done.history[-1]["train_loss"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(model(), Classification(10), CrashAfter(
            SNRRangeDataset(train, (LOW, HIGH), normalize="utterance"), after=4),
            workdir=tmp_path / "run", **kw)
    ckpt = Checkpointer(tmp_path / "run", read_only=True)
    last = ckpt.latest_step()
    ckpt.close()
    assert last == 4  # mid-way through the second epoch
    resumed_model = model()
    resumed = fit(resumed_model, Classification(10), source, workdir=tmp_path / "run", **kw)
    assert resumed.resumed_from == 4 and resumed.history == done.history
    for a, b in zip(params(resumed_model), params(reference), strict=True):
        np.testing.assert_array_equal(a, b)


def test_recipe_data_of_the_audio_variants(train):
    from lepton_mm.data import avmnist_arrays
    from lepton_mm.recipes.avmnist import (
        AVMNISTConfig,
        audio_setting,
        make_data,
        sweep_data,
        train_data,
    )

    config = AVMNISTConfig(num_train=16, num_val=8, num_test=8, train_snr_db=(-20, 20),
                           utterance_norm=True, snr_sweep=(20.0, -15.0))
    assert audio_setting(config, "concat") == (None, True)
    assert audio_setting(config, "concat+snr_range") == ((-20.0, 20.0), True)
    assert audio_setting(config, "audio_only+snr_range+utt_norm") == (
        (-20.0, 20.0), "utterance")
    data = make_data(config, normalize_audio="utterance")
    assert data["audio_stats"] is None and data["audio_norm"] == "utterance"
    raw = train.subset(np.arange(16)).materialize()["audio"]
    standardize_utterances(*raw)
    np.testing.assert_array_equal(data["train"]["audio"][0], raw[0])
    assert train_data(config, data, "audio_only+utt_norm") is data["train"]
    source = train_data(config, data, "audio_only+snr_range+utt_norm")
    assert isinstance(source, SNRRangeDataset) and len(source) == 16
    assert (source.snr_db, source.normalize) == ((-20.0, 20.0), "utterance")
    np.testing.assert_array_equal(source.images, data["train"]["image"])
    # The sweep's audio at another SNR is normalised per utterance too.
    log_mel, mask = sweep_data(config, data)["audio"][20.0]
    for i in range(len(mask)):
        assert log_mel[i][mask[i]].mean() == pytest.approx(0.0, abs=1e-4)
    # The split statistics' data are unchanged by the option.
    split = make_data(config)
    assert split["audio_norm"] == split["audio_stats"] and split["audio_stats"] is not None
    with pytest.raises(ValueError, match="normalize_audio"):
        avmnist_arrays(sizes={"train": 4, "val": 4, "test": 4}, normalize_audio="global")
