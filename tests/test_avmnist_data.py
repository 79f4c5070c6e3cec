"""Tests for lepton_mm.data.avmnist: the AV-MNIST benchmark definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_mm.data import avmnist as av
from lepton_mm.data import load_fsdd, load_mnist


@pytest.fixture(scope="module")
def data():
    return av.load_avmnist(data_seed=0)


@pytest.fixture(scope="module")
def data_seed1():
    return av.load_avmnist(data_seed=1)


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


@pytest.fixture(scope="module")
def fsdd():
    return load_fsdd()


# ------------------------------------------------------------------------------ images


def test_pca_keeps_four_components_for_a_quarter_of_the_variance(data):
    ratio = data.pca.explained_variance_ratio
    assert data.pca.num_components == av.PCA_COMPONENTS == 4
    assert ratio[:4].sum() >= 0.25 > ratio[:3].sum()
    assert np.all(np.diff(ratio) <= 0) and abs(ratio.sum() - 1) < 1e-12


def test_pca_is_fitted_on_the_training_split_only(data, mnist):
    train_images = mnist.x_train[data.train.mnist_index]
    assert len(train_images) == 55000
    expected = av.fit_image_pca(train_images)
    for got, want in zip(data.pca, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    # Not on all 60 000 MNIST training images (train + val): the means differ.
    all_mean = mnist.x_train.reshape(60000, 784).mean(axis=0) / 255.0
    assert np.abs(data.pca.mean - all_mean).max() > 1e-3
    assert np.intersect1d(data.train.mnist_index, data.val.mnist_index).size == 0


def test_pca_components_are_the_principal_axes(data, mnist):
    # Coefficients of the 55 000 training-split images are uncorrelated, and their
    # variances are the retained eigenvalues, as fractions of the total pixel variance.
    x = mnist.x_train[data.train.mnist_index].reshape(55000, 784) / 255.0
    coeffs = data.train.coefficients
    cov = np.cov(coeffs, rowvar=False, bias=True)
    total = x.var(axis=0).sum()
    np.testing.assert_allclose(np.diag(cov) / total, data.pca.explained_variance_ratio[:4],
                               rtol=1e-6)
    np.testing.assert_allclose(cov - np.diag(np.diag(cov)), 0, atol=1e-9 * total)
    np.testing.assert_allclose(data.pca.mean, x.mean(axis=0), atol=1e-12)


def test_images_are_the_projection_onto_the_components(data, mnist):
    v, mu = data.pca.components, data.pca.mean
    np.testing.assert_allclose(v.T @ v, np.eye(4), atol=1e-12)
    for split, source in ((data.train, mnist.x_train), (data.val, mnist.x_train),
                          (data.test, mnist.x_test)):
        rows = np.array([0, 17, len(split) - 1])
        x = source[split.mnist_index[rows]].reshape(3, 784) / 255.0
        expected = mu + (x - mu) @ v @ v.T  # numpy reference, float64
        got = split.images(rows)
        assert got.shape == (3, 28, 28, 1) and got.dtype == np.float32
        np.testing.assert_allclose(got.reshape(3, 784), expected, atol=1e-6)
        # 75 % of the energy (variance) is gone: the residual is large and orthogonal.
        residual = x - expected
        np.testing.assert_allclose(residual @ v, 0, atol=1e-9)


# ------------------------------------------------------------------------------ splits


def test_split_sizes_and_mnist_rows(data, mnist):
    assert [len(s) for s in (data.train, data.val, data.test)] == [55000, 5000, 10000]
    np.testing.assert_array_equal(data.train.mnist_index, np.arange(55000))
    np.testing.assert_array_equal(data.val.mnist_index, np.arange(55000, 60000))
    np.testing.assert_array_equal(data.test.mnist_index, np.arange(10000))
    np.testing.assert_array_equal(data.val.labels, mnist.y_train[55000:])
    np.testing.assert_array_equal(data.test.labels, mnist.y_test)


def test_audio_takes_per_split(data, fsdd):
    takes = {s.name: set(fsdd.take[s.clip_index].tolist())
             for s in (data.train, data.val, data.test)}
    assert takes["train"] == set(range(10, 50))
    assert takes["val"] == set(range(5, 10))
    assert takes["test"] == set(range(5))  # FSDD's official test split
    assert fsdd.is_test[data.test.clip_index].all()
    assert not fsdd.is_test[data.train.clip_index].any()


def test_pairing_matches_digits_and_covers_the_clips(data, fsdd):
    for split in (data.train, data.val, data.test):
        np.testing.assert_array_equal(fsdd.label[split.clip_index], split.labels)
    # Uniform draws: every training clip is used, each about 55000 / 2400 times.
    counts = np.bincount(data.train.clip_index, minlength=3000)[fsdd.take >= 10]
    assert counts.min() > 0 and abs(counts.mean() - 55000 / 2400) < 1e-9
    assert counts.max() < 3 * counts.mean()


# ------------------------------------------------------------------ seeds, determinism


def test_building_twice_gives_identical_examples(data):
    again = av.load_avmnist(data_seed=0)
    for a, b in ((data.train, again.train), (data.test, again.test)):
        np.testing.assert_array_equal(a.clip_index, b.clip_index)
    rows = np.array([3, 7, 41, 54999])
    first, second = data.train[rows], again.train[rows]
    for x, y in zip(jax_leaves(first), jax_leaves(second), strict=True):
        np.testing.assert_array_equal(x, y)
    # An example does not depend on the batch (or subset) it is built in.
    alone = data.train[7]
    sub = data.train.subset(np.array([41, 7]))
    assert sub.example_index.tolist() == [41, 7]
    np.testing.assert_array_equal(data.train.waveforms(7).noisy,
                                  sub.waveforms(1).noisy)
    np.testing.assert_array_equal(alone["audio"][1], first["audio"][1][1])
    np.testing.assert_allclose(alone["audio"][0], first["audio"][0][1], atol=1e-3)
    np.testing.assert_allclose(sub[1]["audio"][0], alone["audio"][0], atol=1e-3)


def jax_leaves(batch):
    return [batch["image"], *batch["audio"], batch["label"]]


def test_data_seed_changes_pairing_and_noise(data, data_seed1):
    a, b = data.train, data_seed1.train
    assert 0.9 < np.mean(a.clip_index != b.clip_index) < 1.0
    np.testing.assert_array_equal(a.labels, b.labels)
    same = np.flatnonzero(a.clip_index[:2000] == b.clip_index[:2000])[:3]
    assert len(same) == 3
    wa, wb = a.waveforms(same), b.waveforms(same)
    np.testing.assert_array_equal(wa.clean, wb.clean)
    assert np.all(np.abs(wa.noisy - wb.noisy).max(axis=1) > 0.1)


def test_noise_follows_the_documented_key_derivation(data):
    # noise of example i of split s = sigma * normal(fold_in(fold_in(fold_in(key(seed),
    # s), i), 1), [8000]) on the clip's samples, sigma = rms * 10 ** (15 / 20).
    for split, split_id in ((data.train, 0), (data.test, 2)):
        i = 123
        w = split.waveforms(i)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(
            jax.random.key(0), split_id), i), 1)
        s, n = int(w.start), int(w.length)
        clip = w.clean[s:s + n].astype(np.float64)
        sigma = np.sqrt(np.mean(clip ** 2)) * 10 ** 0.75
        expected = sigma * np.asarray(jax.random.normal(key, (8000,), jnp.float32))
        np.testing.assert_allclose((w.noisy - w.clean)[s:s + n], expected[s:s + n],
                                   rtol=1e-5, atol=1e-5 * sigma)


# ---------------------------------------------------------------------- audio signal


def test_noise_snr_and_region(data):
    split = data.val
    lengths = np.asarray(split._bank.lengths)[split.clip_index]
    longest = int(np.argmax(lengths))  # a clip filling the whole 1 s window
    rows = np.array([longest, 0, 1, 2])
    w = split.waveforms(rows)
    for j in range(len(rows)):
        s, n = int(w.start[j]), int(w.length[j])
        clean, noise = w.clean[j], w.noisy[j] - w.clean[j]
        assert np.abs(clean).max() == pytest.approx(1.0)
        # Padding stays exactly zero; noise covers exactly the clip's samples.
        assert not np.any(w.noisy[j, :s]) and not np.any(w.noisy[j, s + n:])
        assert np.all(noise[s:s + n] != 0)
        snr = 10 * np.log10(np.sum(clean[s:s + n].astype(np.float64) ** 2)
                            / np.sum(noise[s:s + n].astype(np.float64) ** 2))
        tolerance = 0.5 if n == av.WINDOW else 1.5  # estimator spread ~ 6 / sqrt(n) dB
        assert snr == pytest.approx(av.SNR_DB, abs=tolerance), (j, n, snr)
    assert w.length[0] == av.WINDOW and w.start[0] == 0


def test_place_clip_pads_and_crops():
    placed, start, length = av.place_clip(np.array([0.5, -0.25, 0.5], np.float32), 8)
    assert placed.tolist() == [0, 0, 1, -0.5, 1, 0, 0, 0] and (start, length) == (2, 3)
    long = np.arange(10, dtype=np.float32) - 4.5
    placed, start, length = av.place_clip(long, 6)
    np.testing.assert_allclose(placed, long[2:8] / 4.5)
    assert (start, length) == (0, 6)


def test_mask_marks_padding_only_frames_invalid(data):
    # Hand check: a clip on samples [3000, 5000) of the 8000-sample window. Frame t
    # weighs samples (64 t - 128, 64 t + 128) (the Hann window's first tap is 0), so it
    # sees the clip iff 44.875 < t < 80.11.
    mask = np.asarray(av.window_frame_mask(np.array([3000, 0]), np.array([2000, 8000]),
                                           8000))
    assert mask.shape == (2, 126)
    assert np.flatnonzero(mask[0]).tolist() == list(range(45, 81))
    assert mask[1].all()
    # On real examples: the mask equals an explicit overlap test, and invalid frames are
    # exactly silence (-100 dB) while valid frames carry signal.
    rows = np.arange(0, 5000, 250)
    log_mel, mask = data.val.audio(rows)
    w = data.val.waveforms(rows)
    for j in range(len(rows)):
        s, e = int(w.start[j]), int(w.start[j] + w.length[j])
        expected = [max(64 * t - 127, s) < min(64 * t + 128, e) for t in range(126)]
        assert mask[j].tolist() == expected
        assert np.all(log_mel[j][~mask[j]] == -100.0)
        assert np.all(log_mel[j][mask[j]].max(axis=1) > -100.0)
    assert (~mask).any()  # some clips are shorter than the window


def test_batch_shapes_and_dtypes(data):
    batch = data.test[np.array([0, 5, 9])]
    assert set(batch) == {"image", "audio", "label"}
    assert batch["image"].shape == (3, 28, 28, 1) and batch["image"].dtype == np.float32
    log_mel, mask = batch["audio"]
    assert log_mel.shape == (3, 126, 64) and log_mel.dtype == np.float32
    assert mask.shape == (3, 126) and mask.dtype == np.bool_
    assert batch["label"].dtype == np.int32
    assert np.isfinite(log_mel).all()
    one = data.test[5]
    assert one["image"].shape == (28, 28, 1) and one["audio"][0].shape == (126, 64)
    assert data.test[2:4]["label"].shape == (2,)


def test_materialize_equals_indexing(data):
    sub = data.val.subset(np.arange(100, 230))  # 130 examples: 3 chunks, the last padded
    full = sub.materialize(chunk=64)
    rows = np.array([0, 63, 64, 129])
    batch = sub[rows]
    np.testing.assert_array_equal(full["image"][rows], batch["image"])
    np.testing.assert_array_equal(full["label"][rows], batch["label"])
    np.testing.assert_array_equal(full["audio"][1][rows], batch["audio"][1])
    np.testing.assert_allclose(full["audio"][0][rows], batch["audio"][0], atol=1e-3)
    assert full["audio"][0].shape == (130, 126, 64)


def test_bad_arguments():
    with pytest.raises(ValueError, match="data_seed"):
        av.load_avmnist(data_seed=-1)
    with pytest.raises(ValueError, match="variance"):
        av.fit_image_pca(np.zeros((3, 4)), variance=0.0)
    with pytest.raises(TypeError, match="starts"):
        av.window_frame_mask(np.zeros(2), np.zeros(2, int), 8000)
    with pytest.raises(ValueError, match="lengths"):
        av.window_frame_mask(np.zeros(2, int), np.zeros(3, int), 8000)
    with pytest.raises(ValueError, match="waveform"):
        av.place_clip(np.zeros(0, np.float32))


def test_log_mel_statistics_equal_numpy_over_valid_frames():
    rng = np.random.default_rng(0)
    log_mel = rng.normal(3.0, 2.0, (50, 7, 4)).astype(np.float32)
    mask = rng.random((50, 7)) < 0.6
    mean, std = av.log_mel_statistics(log_mel, mask, chunk=8)  # several chunks
    valid = log_mel[mask].astype(np.float64)
    assert mean.dtype == std.dtype == np.float32
    np.testing.assert_allclose([mean, std], [valid.mean(), valid.std()], rtol=1e-6)
    x = log_mel.copy()
    av.standardize_log_mel(x, (mean, std))
    np.testing.assert_allclose(x[mask].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(x[mask].std(), 1.0, atol=1e-5)
    av.standardize_log_mel(x, None)  # None: unchanged
    with pytest.raises(ValueError, match="no valid frame"):
        av.log_mel_statistics(log_mel, np.zeros((50, 7), bool))
    with pytest.raises(ValueError, match="mask"):
        av.log_mel_statistics(log_mel, mask[:, :5])


def test_avmnist_arrays_are_the_materialized_splits_standardized(data):
    arrays = av.avmnist_arrays(data_seed=0, sizes={"train": 96, "val": 40, "test": 40})
    assert [len(arrays[s]["label"]) for s in ("train", "val", "test")] == [96, 40, 40]
    raw = data.train.subset(np.arange(96)).materialize()
    mean, std = arrays["audio_stats"]
    assert (mean, std) == av.log_mel_statistics(*raw["audio"])  # training split only
    np.testing.assert_array_equal(arrays["train"]["image"], raw["image"])
    np.testing.assert_array_equal(arrays["train"]["audio"][1], raw["audio"][1])
    np.testing.assert_allclose(arrays["train"]["audio"][0], (raw["audio"][0] - mean) / std,
                               rtol=1e-5, atol=1e-5)
    plain = av.avmnist_arrays(data_seed=0, sizes={"test": 40, "train": 96},
                              normalize_audio=False)
    assert plain["audio_stats"] is None and len(plain["val"]["label"]) == 5000
    np.testing.assert_array_equal(plain["test"]["audio"][0],
                                  data.test.subset(np.arange(40)).materialize()["audio"][0])
    with pytest.raises(ValueError, match="num_val"):
        av.avmnist_arrays(sizes={"val": 0})
    with pytest.raises(ValueError, match="unknown split"):
        av.avmnist_arrays(sizes={"validation": 3})
