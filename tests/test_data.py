"""Tests for lepton_mm.data: bundled loaders (checksums, resolution) and file readers."""

import gzip
import hashlib
import json
import shutil

import librosa
import numpy as np
import pytest
import soundfile
from PIL import Image

from lepton_mm import data
from lepton_mm.data import DataFileError, UnreadableFileError


# ---------------------------------------------------------------- bundled data sets
def test_mnist_matches_published_statistics():
    m = data.load_mnist()
    assert m.x_train.shape == (60000, 28, 28) and m.x_train.dtype == np.uint8
    assert m.x_test.shape == (10000, 28, 28)
    # Label counts and the canonical pixel mean from data/README.md.
    np.testing.assert_array_equal(
        np.bincount(m.y_train), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
    np.testing.assert_array_equal(
        np.bincount(m.y_test), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    assert abs(m.x_train.mean() / 255 - 0.1306605) < 1e-6


def test_fsdd_structure_and_official_split():
    f = data.load_fsdd()
    assert f.sample_rate == 8000
    assert len(f.waveforms) == 3000
    assert all(w.dtype == np.float32 and w.ndim == 1 for w in f.waveforms)
    assert max(np.abs(w).max() for w in f.waveforms) <= 1.0
    np.testing.assert_array_equal(np.bincount(f.label), [300] * 10)
    np.testing.assert_array_equal(f.is_test, f.take <= 4)
    assert f.is_test.sum() == 300
    durations = np.array([len(w) for w in f.waveforms]) / f.sample_rate
    assert 0.13 < durations.min() < 0.15 and 2.2 < durations.max() < 2.3
    # Filenames follow FSDD's "<digit>_<speaker>_<take>.wav" convention.
    for i in (0, 1234, 2999):
        digit, speaker, take = f.filename[i].removesuffix(".wav").split("_")
        assert int(digit) == f.label[i] and int(take) == f.take[i]
        assert speaker == f.speaker_names[f.speaker[i]]


def test_mustard_folds_partition_the_data():
    s = data.load_mustard()
    assert len(s.utterances) == len(s.ids) == len(s.labels) == 690
    assert s.labels.sum() == 345
    tests = np.concatenate([test for _, test in s.folds])
    np.testing.assert_array_equal(np.sort(tests), np.arange(690))
    for train, test in s.folds:
        assert len(train) == 552 and len(test) == 138
        assert not set(train) & set(test)
    train, test = s.speaker_independent_split()
    assert len(test) == 356 and all(s.shows[i] == "FRIENDS" for i in test)
    assert len(train) + len(test) == 690


def _copy(name, folder):
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(data.verified_path(name), folder / name)
    return folder / name


def test_resolution_order_argument_then_env_then_repo(tmp_path, monkeypatch):
    monkeypatch.delenv(data.bundled.ENV_VAR, raising=False)
    repo_dir, source = data.resolve_data_dir()
    assert source == "repository data/" and (repo_dir / "mnist.npz").is_file()

    env_dir = tmp_path / "env"
    _copy("mustard_text.json.gz", env_dir)
    monkeypatch.setenv(data.bundled.ENV_VAR, str(env_dir))
    assert data.resolve_data_dir() == (env_dir, "$LEPTON_MM_DATA")
    assert data.verified_path("mustard_text.json.gz").parent == env_dir
    # The env folder lacks mnist.npz: the loader must not silently fall back to the repo.
    with pytest.raises(DataFileError, match="mnist.npz not found") as err:
        data.load_mnist()
    assert str(env_dir) in str(err.value) and data.CHECKSUMS["mnist.npz"] in str(err.value)

    arg_dir = tmp_path / "arg"
    _copy("mustard_text.json.gz", arg_dir)
    assert data.verified_path("mustard_text.json.gz", arg_dir).parent == arg_dir
    assert len(data.load_mustard(data_dir=arg_dir).ids) == 690


def test_checksum_mismatch_names_file_expected_hash_and_place(tmp_path):
    path = _copy("mustard_text.json.gz", tmp_path)
    # Re-compress the same JSON with one label flipped: a valid file, wrong contents.
    with gzip.open(path, "rt", encoding="utf-8") as f:
        raw = json.load(f)
    raw["items"][0]["sarcasm"] = not raw["items"][0]["sarcasm"]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(raw, f)
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(DataFileError) as err:
        data.load_mustard(data_dir=tmp_path)
    msg = str(err.value)
    assert "mustard_text.json.gz" in msg and str(tmp_path) in msg
    assert data.CHECKSUMS["mustard_text.json.gz"] in msg and actual in msg


def test_truncated_data_file_is_rejected(tmp_path):
    path = _copy("fsdd.npz", tmp_path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(DataFileError, match="fails its checksum"):
        data.load_fsdd(data_dir=tmp_path)


def test_unknown_data_file_name():
    with pytest.raises(ValueError, match="unknown data file"):
        data.verified_path("cifar10.npz")


# ---------------------------------------------------------------- load_image
def test_load_image_rgb_gray_and_resize(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(10, 14, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    out = data.load_image(tmp_path / "x.png")
    assert out.shape == (10, 14, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, rgb / 255.0, atol=1e-7)

    gray = data.load_image(tmp_path / "x.png", grayscale=True)
    assert gray.shape == (10, 14, 1)
    # ITU-R 601-2 luma, which pillow rounds to uint8.
    rgb = rgb.astype(np.int64)
    luma = (rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114) / 1000
    assert np.abs(gray[..., 0] * 255 - luma).max() <= 1.0

    small = data.load_image(tmp_path / "x.png", size=(5, 7))
    assert small.shape == (5, 7, 3) and 0 <= small.min() and small.max() <= 1
    assert data.load_image(tmp_path / "x.png", size=4).shape == (4, 4, 3)


def test_load_image_other_modes(tmp_path):
    Image.fromarray(np.full((4, 4, 4), 200, np.uint8), "RGBA").save(tmp_path / "a.png")
    np.testing.assert_allclose(data.load_image(tmp_path / "a.png"), 200 / 255, atol=1e-7)
    Image.fromarray(np.full((3, 3), 65535, np.uint16)).save(tmp_path / "b.png")
    np.testing.assert_allclose(data.load_image(tmp_path / "b.png", grayscale=True), 1.0)
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tmp_path / "c.jpg", quality=95)
    np.testing.assert_allclose(data.load_image(tmp_path / "c.jpg"), 128 / 255, atol=2 / 255)


def test_load_image_bad_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        data.load_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UnreadableFileError, match="empty.png"):
        data.load_image(tmp_path / "empty.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(UnreadableFileError, match="text.png"):
        data.load_image(tmp_path / "text.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(tmp_path / "full.png")
    blob = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UnreadableFileError, match="cut.png"):
        data.load_image(tmp_path / "cut.png")
    with pytest.raises(ValueError, match="size"):
        data.load_image(tmp_path / "full.png", size=(0, 3))
    with pytest.raises(TypeError, match="path"):
        data.load_image(123)


# ---------------------------------------------------------------- load_audio
def test_load_audio_resamples_and_mixes_to_mono(tmp_path):
    sr = 16000
    t = np.arange(sr // 2) / sr
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    right = 0.25 * np.sin(2 * np.pi * 660 * t)
    soundfile.write(tmp_path / "s.wav", np.stack([left, right], 1), sr, subtype="FLOAT")
    out = data.load_audio(tmp_path / "s.wav", sample_rate=8000)
    assert out.dtype == np.float32 and out.shape == (4000,)
    ref = librosa.load(tmp_path / "s.wav", sr=8000, mono=True)[0]
    np.testing.assert_allclose(out, ref, atol=1e-5)

    same = data.load_audio(tmp_path / "s.wav", sample_rate=sr)
    np.testing.assert_allclose(same, (left + right) / 2, atol=1e-6)

    soundfile.write(tmp_path / "s.flac", left, sr)
    flac = data.load_audio(tmp_path / "s.flac", sample_rate=sr)
    np.testing.assert_allclose(flac, left, atol=1e-4)  # 16-bit FLAC quantisation


def test_load_audio_bad_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        data.load_audio(tmp_path / "nope.wav", sample_rate=8000)
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(UnreadableFileError, match="empty.wav"):
        data.load_audio(tmp_path / "empty.wav", sample_rate=8000)
    (tmp_path / "junk.wav").write_bytes(b"RIFF1234WAVEjunkjunkjunk")
    with pytest.raises(UnreadableFileError, match="junk.wav"):
        data.load_audio(tmp_path / "junk.wav", sample_rate=8000)
    soundfile.write(tmp_path / "zero.wav", np.zeros(0), 8000)
    with pytest.raises(UnreadableFileError, match="zero.wav"):
        data.load_audio(tmp_path / "zero.wav", sample_rate=8000)
    soundfile.write(tmp_path / "ok.wav", np.zeros(100), 8000)
    for bad in (0, -8000, 8000.5, True):
        with pytest.raises(ValueError, match="sample_rate"):
            data.load_audio(tmp_path / "ok.wav", sample_rate=bad)
