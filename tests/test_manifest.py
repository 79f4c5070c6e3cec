"""lepton_mm.data.ManifestDataset: your own files through grain, against the in-memory path.

The reference for the file path is AV-MNIST computed in memory
(``AVMNISTSplit.materialize``), independently of the exported files: the same examples
written by ``export_avmnist_files`` and read back must give the same batches, the same
training run and an exact mid-epoch resume. Bad rows are built by hand, one kind each.
"""

import doctest
import json
import wave

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile
from _sources import CrashAfter
from flax import nnx
from PIL import Image

from lepton_mm.data import (
    ArrayDataset,
    BatchSource,
    ManifestDataset,
    ManifestRowError,
    avmnist_file_features,
    export_avmnist_files,
    load_avmnist,
    log_mel_statistics,
    standardize_log_mel,
)
from lepton_mm.encoders import ImageCNN
from lepton_mm.models import Classification, build_classifier
from lepton_mm.training import Checkpointer, OptimizerConfig, fit, predict, seed_rngs
from lepton_mm.types import EncoderOutput

N = 200  # examples exported: 10 batches of 20, or 4 of 64 with the last one padded


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(CSV manifest, JSONL manifest, the in-memory reference arrays)."""
    folder = tmp_path_factory.mktemp("avmnist_files")
    manifest = export_avmnist_files(folder, index=np.arange(N))
    # the same rows as JSONL, written here from the CSV (not by the exporter)
    lines = manifest.read_text().splitlines()
    header = lines[0].split(",")
    jsonl = folder / "manifest.jsonl"
    jsonl.write_text("".join(
        json.dumps({k: (int(v) if k == "label" else v)
                    for k, v in zip(header, line.split(","), strict=True)}) + "\n"
        for line in lines[1:]))
    reference = load_avmnist().train.subset(np.arange(N)).materialize()
    standardize_log_mel(reference["audio"][0], log_mel_statistics(*reference["audio"]))
    return manifest, jsonl, reference


@pytest.fixture(scope="module")
def from_files(exported):
    """The CSV manifest's ``ManifestDataset`` (stateless: the tests share it)."""
    return open_manifest(exported[0])


def open_manifest(path, **kwargs):
    return ManifestDataset(path, grayscale=True, sample_rate=8000,
                           features=avmnist_file_features(path.parent), **kwargs)


def assert_same_batch(files, memory):
    assert sorted(files) == sorted(memory)
    np.testing.assert_array_equal(files["label"], memory["label"])
    np.testing.assert_array_equal(files["valid"], memory["valid"])
    np.testing.assert_allclose(files["image"], memory["image"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(files["audio"][0], memory["audio"][0], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(files["audio"][1], memory["audio"][1])
    assert files["image"].dtype == np.float32 and files["label"].dtype == np.int32


@pytest.mark.parametrize("kwargs", [
    {"seed": 3, "epoch": 1},
    {"seed": 3, "epoch": 1, "start": 2, "rows": slice(16, 48)},
    {"seed": 0, "epoch": 0, "shuffle": False},
])
def test_files_give_the_in_memory_batches(exported, from_files, kwargs):
    files, reference = from_files, exported[2]
    memory = ArrayDataset(reference)
    assert isinstance(files, BatchSource) and len(files) == N and not files.skipped
    got = list(files.batches(64, **kwargs))
    want = list(memory.batches(64, **kwargs))
    assert len(got) == len(want) == 4 - kwargs.get("start", 0)
    for a, b in zip(got, want, strict=True):
        assert_same_batch(a, b)
    if "start" not in kwargs:  # every example once
        assert sum(int(b["valid"].sum()) for b in got) == N


def test_jsonl_and_csv_manifests_give_the_same_batches(exported, from_files):
    csv_batches = list(from_files.batches(64, seed=5, epoch=2))
    for a, b in zip(open_manifest(exported[1]).batches(64, seed=5, epoch=2), csv_batches,
                    strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_worker_processes_give_the_in_process_batches(exported, from_files):
    kw = {"seed": 1, "epoch": 0, "start": 1, "rows": slice(8, 40)}
    in_process = list(from_files.batches(64, **kw))
    workers = open_manifest(exported[0], num_workers=2, num_threads=0, prefetch=0,
                            validate=False)
    got = list(workers.batches(64, **kw))
    assert len(got) == len(in_process) == 3
    for a, b in zip(got, in_process, strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)
        assert type(a["image"]) is np.ndarray  # copied out of grain's shared memory


# ------------------------------------------------------------------------------ fit


class MelFrames(nnx.Module):
    """Log-mel frames [b, time, mels] + mask → tokens (an encoder that compiles fast)."""

    def __init__(self, mels, dim, rngs):
        self.dim = dim
        self.proj = nnx.Linear(mels, dim, rngs=rngs)

    def __call__(self, log_mel, mask):
        return EncoderOutput.from_tokens(jnp.tanh(self.proj(log_mel)), mask)


def small_model():
    rngs = seed_rngs(0)
    encoders = {"image": ImageCNN(1, dim=8, widths=(4,), rngs=rngs),
                "audio": MelFrames(64, 8, rngs)}
    return build_classifier(encoders, "concat", num_outputs=10, fusion_dim=8, rngs=rngs)


def params_of(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.Param)))]


def test_fit_from_files_matches_fit_from_memory_and_resumes_mid_epoch(exported, from_files,
                                                                      tmp_path):
    manifest, _, reference = exported
    task = Classification(10)
    evaluation = {k: v[:N // 2] if k != "audio" else (v[0][:N // 2], v[1][:N // 2])
                  for k, v in reference.items()}
    kw = {"eval_data": evaluation, "epochs": 1, "batch_size": 40, "seed": 4,
          "optimizer": OptimizerConfig(learning_rate=3e-3)}

    memory_model = small_model()
    memory = fit(memory_model, task, ArrayDataset(reference), workdir=tmp_path / "memory",
                 **kw)
    files_model = small_model()
    files = fit(files_model, task, from_files, workdir=tmp_path / "files", **kw)
    assert files.step == memory.step == N // 40
    for a, b in zip(files.history, memory.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["eval"]["accuracy"] == b["eval"]["accuracy"]
        assert a["eval"]["loss"] == pytest.approx(b["eval"]["loss"], rel=1e-5)
    for a, b in zip(params_of(files_model), params_of(memory_model), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    # crash after three batches; the last checkpoint is after two
    crashing = CrashAfter(open_manifest(manifest), after=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(small_model(), task, crashing, workdir=tmp_path / "run", checkpoint_every=2,
            **kw)
    ckpt = Checkpointer(tmp_path / "run", read_only=True)
    last = ckpt.latest_step()
    ckpt.close()
    assert last == 2  # mid-epoch: the position (epoch 0, batch 2) is all that was saved
    resumed_model = small_model()
    resumed = fit(resumed_model, task, open_manifest(manifest), workdir=tmp_path / "run",
                  checkpoint_every=2, **kw)
    assert resumed.resumed_from == last and resumed.step == files.step
    assert resumed.history == files.history
    for a, b in zip(params_of(resumed_model), params_of(files_model), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------- bad rows


def write_png(path, size=8, value=100):
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)


def write_wav(path, rate=8000, n=800):
    soundfile.write(path, np.linspace(-0.5, 0.5, n, dtype=np.float32), rate,
                    subtype="FLOAT")


@pytest.fixture
def files(tmp_path):
    """A folder with good and bad image and audio files."""
    write_png(tmp_path / "good.png", value=10)
    write_png(tmp_path / "good2.png", value=20)
    write_png(tmp_path / "big.png", size=9)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)
    write_wav(tmp_path / "good.wav")
    write_wav(tmp_path / "16k.wav", rate=16000)
    with wave.open(str(tmp_path / "truncated.wav"), "wb") as w:  # header says more data
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(np.zeros(400, np.int16).tobytes())
    data = (tmp_path / "truncated.wav").read_bytes()
    (tmp_path / "truncated.wav").write_bytes(data[:44])
    return tmp_path


BAD_ROWS = {  # bad row -> (file named in the error, words in the reason)
    "missing.png,good.wav,1": ("missing.png", "not found"),
    "corrupt.png,good.wav,1": ("corrupt.png", "cannot read image"),
    "big.png,good.wav,1": ("big.png", "gives float32 [9, 9, 3], but row 1 gave float32 [8, 8, 3]"),
    "good.png,16k.wav,1": ("16k.wav", "16000 Hz, expected sample_rate=8000"),
    "good.png,truncated.wav,1": ("truncated.wav", "audio"),
    "good.png,good.wav,seven": (None, "expected a number"),
    "good.png,,1": (None, "no value in column 'audio'"),
    "good.png,good.wav": (None, "expected 3 fields"),
}


@pytest.mark.parametrize("bad", list(BAD_ROWS))
def test_a_bad_row_raises_naming_its_row_line_and_file(files, bad):
    (files / "m.csv").write_text(f"image,audio,label\ngood.png,good.wav,0\n\n{bad}\n")
    with pytest.raises(ManifestRowError) as info:
        ManifestDataset(files / "m.csv", sample_rate=8000)
    error, (name, reason) = info.value, BAD_ROWS[bad]
    assert (error.row, error.line) == (2, 4)  # the blank line 3 is not a row
    assert str(files / "m.csv") in str(error) and "row 2 (line 4)" in str(error)
    assert reason in str(error)
    if name is None:
        assert error.file is None
    else:
        assert error.file == files / name and str(files / name) in str(error)


def test_skip_mode_leaves_bad_rows_out_and_counts_them(files):
    bad = list(BAD_ROWS)
    rows = ["good.png,good.wav,3", *bad[:4], "good2.png,good.wav,5", *bad[4:]]
    (files / "m.csv").write_text("image,audio,label\n" + "\n".join(rows) + "\n")
    data = ManifestDataset(files / "m.csv", sample_rate=8000, grayscale=True,
                           on_error="skip")
    assert len(data) == 2 and len(data.skipped) == len(BAD_ROWS)
    assert [e.row for e in data.skipped] == [2, 3, 4, 5, 7, 8, 9, 10]
    assert data.row_numbers().tolist() == [1, 6]
    (batch,) = data.batches(4, seed=0, epoch=0, shuffle=False)
    assert batch["label"].tolist() == [3, 5, 3, 5] and batch["valid"].tolist() == [
        True, True, False, False]
    np.testing.assert_array_equal(batch["image"][:2, 0, 0, 0], np.float32([10, 20]) / 255)
    np.testing.assert_array_equal(batch["audio"][0], np.linspace(-0.5, 0.5, 800,
                                                                 dtype=np.float32))


def test_jsonl_unknown_or_missing_keys_are_bad_rows(files):
    rows = [{"image": "good.png", "label": 1},
            {"image": "good.png", "label": 2, "caption": "x"},
            {"label": 3},
            "not json {",
            {"image": "good2.png", "label": 4}]
    (files / "m.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r)
                                             for r in rows) + "\n")
    with pytest.raises(ManifestRowError, match=r"row 2 \(line 2\): unknown column\(s\) "
                                               r"\['caption'\]"):
        ManifestDataset(files / "m.jsonl")
    data = ManifestDataset(files / "m.jsonl", on_error="skip")
    assert [(e.row, e.reason.split(" (")[0].split(";")[0]) for e in data.skipped] == [
        (2, "unknown column(s) ['caption']"), (3, "missing required column(s) ['image']"),
        (4, "not valid JSON")]
    assert len(data) == 2
    assert len(ManifestDataset(files / "m.jsonl", ignore_columns=["caption"],
                               on_error="skip")) == 3


def test_csv_header_with_unknown_or_missing_columns_fails(files):
    (files / "m.csv").write_text("image,caption,label\ngood.png,a digit,1\n")
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['caption'\]"):
        ManifestDataset(files / "m.csv", on_error="skip")
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['wav'\]"):
        ManifestDataset(files / "m.csv", columns={"image": "image", "audio": "wav"},
                        ignore_columns=["caption", "label"])
    assert len(ManifestDataset(files / "m.csv", ignore_columns=["caption"])) == 1


def test_text_column_through_a_tokenizer_and_configured_columns(files):
    (files / "m.csv").write_text("picture,caption,digit,id\n"
                                 "good.png,ab,cat,7\n"
                                 "good2.png,abcdefghij,dog,8\n")
    vocab = {c: i + 1 for i, c in enumerate("abcdefghij")}
    data = ManifestDataset(
        files / "m.csv", columns={"image": "picture", "text": "caption", "label": "digit"},
        ignore_columns=["id"], tokenizer=lambda s: {"input_ids": [vocab[c] for c in s]},
        max_text_length=4, classes=["dog", "cat"], grayscale=True)
    (batch,) = data.batches(2, seed=0, epoch=0, shuffle=False)
    ids, mask = batch["text"]
    assert ids.dtype == np.int32 and mask.dtype == bool
    assert ids.tolist() == [[1, 2, 0, 0], [1, 2, 3, 4]]
    assert mask.tolist() == [[True, True, False, False], [True] * 4]
    assert batch["label"].tolist() == [1, 0] and sorted(batch) == [
        "image", "label", "text", "valid"]


def test_bad_arguments_name_the_argument(files):
    (files / "m.csv").write_text("image,audio\ngood.png,good.wav\n")
    for kwargs, match in [({}, "sample_rate: needed"),
                          ({"sample_rate": 8000, "on_error": "ignore"}, "on_error"),
                          ({"sample_rate": 8000, "on_error": "skip", "validate": False},
                           "validate"),
                          ({"sample_rate": 8000, "num_threads": 4, "prefetch": 2},
                           "prefetch"),
                          ({"sample_rate": 8000, "features": {"label": abs}}, "features"),
                          ({"sample_rate": 8000, "image_size": -3}, "size")]:
        with pytest.raises(ValueError, match=match):
            ManifestDataset(files / "m.csv", **kwargs)
    with pytest.raises(ValueError, match="manifest: expected a .csv"):
        ManifestDataset(files / "good.png")


def test_log_mel_features_docstring_example_runs():
    from lepton_mm.data import log_mel_features

    results = doctest.testmod(log_mel_features, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0


# ---------------------------------------------------------------- missing modalities

HEAD = 16  # rows of the exported manifest that the missing-modality tests use
ABSENT = {"image": [2, 7], "audio": [4, 9, 11]}  # 0-based rows whose cell is emptied


@pytest.fixture(scope="module")
def absent_manifests(exported):
    """(the first HEAD rows as CSV, the same with ABSENT's cells empty, that as JSONL with
    a null image and no audio key), next to the exported files."""
    manifest = exported[0]
    header, *lines = manifest.read_text().splitlines()[:HEAD + 1]
    rows = [dict(zip(header.split(","), line.split(","), strict=True)) for line in lines]
    full, csv_path, jsonl_path = (manifest.parent / f"head.{ext}"
                                  for ext in ("csv", "absent.csv", "absent.jsonl"))
    full.write_text("\n".join([header, *lines]) + "\n")
    for m, index in ABSENT.items():
        for i in index:
            rows[i][m] = ""
    csv_path.write_text("\n".join([header, *(",".join(r.values()) for r in rows)]) + "\n")
    records = [{"image": r["image"] or None, "label": int(r["label"]),
                **({"audio": r["audio"]} if r["audio"] else {})} for r in rows]
    jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return full, csv_path, jsonl_path


class CountingFeature:
    """A feature function that records the shape of each input it is called on."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x):
        self.calls.append(x.shape)
        return self.fn(x)


def test_absent_cells_give_present_flags_and_zero_placeholders(absent_manifests):
    full, with_gaps, jsonl = absent_manifests
    complete = open_manifest(full)
    data = open_manifest(with_gaps, missing_modality="absent")
    assert data.num_absent == {"image": 2, "audio": 3} and not data.skipped
    assert len(data) == HEAD and "present" not in complete[0]
    from_jsonl = open_manifest(jsonl, missing_modality="absent")
    for kwargs in [{"seed": 3, "epoch": 1}, {"seed": 0, "epoch": 0, "start": 1}]:
        plan = data.batch_indices(6, shuffle=True, **{k: v for k, v in kwargs.items()
                                                      if k != "start"})
        got = list(data.batches(6, **kwargs))
        want = list(complete.batches(6, **kwargs))
        assert len(got) == len(want) == 3 - kwargs.get("start", 0)
        for a, b, c, (index, _) in zip(got, want, from_jsonl.batches(6, **kwargs),
                                       plan[kwargs.get("start", 0):], strict=True):
            jax.tree.map(np.testing.assert_array_equal, a, c)  # CSV and JSONL agree
            assert sorted(a) == sorted([*b, "present"]) and sorted(a["present"]) == [
                "audio", "image"]
            for m in ("image", "audio"):
                lacking = np.isin(index, ABSENT[m])
                assert a["present"][m].dtype == bool
                np.testing.assert_array_equal(a["present"][m], ~lacking)
                for x, y in zip(jax.tree.leaves(a[m]), jax.tree.leaves(b[m]), strict=True):
                    assert x.dtype == y.dtype and x.shape == y.shape
                    assert not x[lacking].any()  # zeros; masks all False
                    np.testing.assert_array_equal(x[~lacking], y[~lacking])  # bit-identical
            for k in ("label", "valid"):
                np.testing.assert_array_equal(a[k], b[k])

    # the audio features run on the 13 waveforms there are, never on a missing one
    counting = CountingFeature(avmnist_file_features(full.parent)["audio"])
    data = ManifestDataset(with_gaps, grayscale=True, sample_rate=8000, validate=False,
                           features={**avmnist_file_features(full.parent), "audio": counting},
                           missing_modality="absent")
    counting.calls.clear()  # the placeholder's shape came from one row's audio
    (batch,) = data.batches(HEAD, seed=0, epoch=0, shuffle=False)
    assert len(counting.calls) == HEAD - len(ABSENT["audio"])
    assert batch["present"]["audio"].tolist() == [i not in ABSENT["audio"]
                                                  for i in range(HEAD)]


def test_fit_trains_on_absent_cells_and_ignores_what_they_hold(absent_manifests, tmp_path):
    full, with_gaps, _ = absent_manifests
    data = open_manifest(with_gaps, missing_modality="absent")
    model = small_model()
    before = params_of(model)
    run = fit(model, Classification(10), data, workdir=tmp_path, epochs=1, batch_size=8,
              seed=0, optimizer=OptimizerConfig(learning_rate=3e-3))
    assert run.step == 2 and np.isfinite(run.history[0]["train_loss"])
    assert any(not np.array_equal(a, b) for a, b in zip(params_of(model), before,
                                                        strict=True))

    # The rows as arrays, the absent cells holding what their files would have given
    # (the complete manifest's rows), or another row's data: the predictions are those
    # of the zero placeholders, since present is False there.
    (gaps,) = data.batches(HEAD, seed=0, epoch=0, shuffle=False)
    (complete,) = open_manifest(full).batches(HEAD, seed=0, epoch=0, shuffle=False)
    predictions = predict(model, data, batch_size=8)
    for source in (complete, jax.tree.map(lambda x: np.roll(x, 1, axis=0), complete)):
        filled = {k: v for k, v in gaps.items() if k != "valid"}
        for m, index in ABSENT.items():
            filled[m] = jax.tree.map(lambda x, y, i=index: np.where(
                np.isin(np.arange(HEAD), i).reshape(-1, *[1] * (x.ndim - 1)), y, x),
                gaps[m], source[m])
        assert not all(np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(filled), jax.tree.leaves({k: gaps[k] for k in filled}),
            strict=True))
        np.testing.assert_array_equal(predict(model, filled, batch_size=8), predictions)
    # where both modalities are present, the predictions are those of the complete rows;
    # where one is absent, they are not (the flags reach the model)
    with_both = open_manifest(full)
    reference = predict(model, with_both, batch_size=8)
    lacking = np.isin(np.arange(HEAD), ABSENT["image"] + ABSENT["audio"])
    np.testing.assert_array_equal(predictions[~lacking], reference[~lacking])
    assert (np.abs(predictions - reference).max(axis=1) > 1e-6)[lacking].all()


@pytest.fixture
def gaps(files):
    """A CSV manifest with absent cells, all-absent rows and bad rows among them."""
    (files / "m.csv").write_text("image,audio,label\n"
                                 "good.png,good.wav,0\n"
                                 "good2.png,,1\n"     # row 2: no audio
                                 ",good.wav,2\n"      # row 3: no image
                                 ",,3\n"              # row 4: no modality at all
                                 "missing.png,,4\n"   # row 5: a file that is not there
                                 "good.png,good.wav,\n"  # row 6: no label
                                 "big.png,,5\n")      # row 7: another image shape
    return files / "m.csv"


def test_missing_cells_are_bad_rows_by_default(gaps, files):
    with pytest.raises(ManifestRowError, match=r"row 2 \(line 3\): no value in column "
                                               r"'audio'"):
        ManifestDataset(gaps, sample_rate=8000)
    data = ManifestDataset(gaps, sample_rate=8000, on_error="skip")
    assert data.row_numbers().tolist() == [1] and data.num_absent == {"image": 0, "audio": 0}
    assert [e.row for e in data.skipped] == [2, 3, 4, 5, 6, 7]
    assert "present" not in next(data.batches(2, seed=0, epoch=0))
    (files / "m.jsonl").write_text(json.dumps({"image": None, "audio": "good.wav",
                                               "label": 1}) + "\n")
    with pytest.raises(ManifestRowError, match=r"row 1 \(line 1\): no value in column "
                                               r"'image'"):
        ManifestDataset(files / "m.jsonl", sample_rate=8000)


def test_absent_mode_still_rejects_rows_without_a_modality_label_or_file(gaps):
    with pytest.raises(ManifestRowError, match=r"row 4 \(line 5\): no value in any "
                                               r"modality column \('image', 'audio'\)"):
        ManifestDataset(gaps, sample_rate=8000, missing_modality="absent")
    data = ManifestDataset(gaps, sample_rate=8000, grayscale=True, on_error="skip",
                           missing_modality="absent")
    assert data.row_numbers().tolist() == [1, 2, 3]
    assert data.num_absent == {"image": 1, "audio": 1}
    reasons = {e.row: e.reason for e in data.skipped}
    assert sorted(reasons) == [4, 5, 6, 7]
    assert "no value in any modality column" in reasons[4]
    assert "not found" in reasons[5] and data.skipped[1].file == gaps.parent / "missing.png"
    assert reasons[6] == "no value in column 'label'."
    assert "gives float32 [9, 9, 1], but row 1 gave float32 [8, 8, 1]" in reasons[7]
    assert "absent=" in repr(data)
    (batch,) = data.batches(4, seed=0, epoch=0, shuffle=False)
    assert batch["present"]["image"].tolist() == [True, True, False, True]
    assert batch["present"]["audio"].tolist() == [True, False, True, True]
    assert batch["image"].shape == (4, 8, 8, 1) and batch["audio"].shape == (4, 800)
    np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], np.float32([10, 20, 0, 10])
                                  / 255)
    np.testing.assert_array_equal(batch["audio"][1], np.zeros(800, np.float32))


def test_absent_text_and_validate_false(files):
    rows = [{"image": "good.png", "text": None, "label": 0},
            {"image": None, "text": "ab", "label": 1},
            {"text": "abc", "label": 2},  # no image key: absent too
            {"image": "good2.png", "text": "", "label": 3}]  # "" is absent with "absent"
    (files / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    vocab = {c: i + 1 for i, c in enumerate("abc")}
    kwargs = {"tokenizer": lambda s: [vocab[c] for c in s], "max_text_length": 4,
              "grayscale": True, "missing_modality": "absent"}
    checked = ManifestDataset(files / "m.jsonl", **kwargs)
    assert checked.columns == {"image": "image", "text": "text", "label": "label"}
    (batch,) = checked.batches(4, seed=0, epoch=0, shuffle=False)
    ids, mask = batch["text"]
    assert ids.tolist() == [[0] * 4, [1, 2, 0, 0], [1, 2, 3, 0], [0] * 4]
    assert mask.tolist() == [[False] * 4, [True, True, False, False],
                             [True, True, True, False], [False] * 4]
    assert batch["present"]["text"].tolist() == [False, True, True, False]
    assert batch["present"]["image"].tolist() == [True, False, False, True]
    # without the up-front pass the placeholders come from the first row that has each
    # modality: the same batches
    unchecked = ManifestDataset(files / "m.jsonl", validate=False, **kwargs)
    for a, b in zip(unchecked.batches(3, seed=2, epoch=1), checked.batches(
            3, seed=2, epoch=1), strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    assert sorted(unchecked[2]["present"].items()) == [("image", False), ("text", True)]


def test_absent_mode_needs_some_row_with_each_modality_and_a_known_option(files):
    (files / "m.csv").write_text("image,audio,label\ngood.png,,1\ngood2.png,,2\n")
    with pytest.raises(ValueError, match="no usable row of .* has a value in column "
                                         "'audio'"):
        ManifestDataset(files / "m.csv", sample_rate=8000, missing_modality="absent")
    assert len(ManifestDataset(files / "m.csv", columns={"image": "image", "label": "label"},
                               ignore_columns=["audio"], missing_modality="absent")) == 2
    with pytest.raises(ValueError, match=r"missing_modality: expected one of \['error', "
                                         r"'absent'\], got 'skip'"):
        ManifestDataset(files / "m.csv", sample_rate=8000, missing_modality="skip")
