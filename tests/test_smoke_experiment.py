"""experiments/smoke.py: config conversion, validation, data, and a tiny end-to-end run."""

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_argparse_converts_to_a_typed_config(smoke):
    config, args = smoke.parse_args(["--quick", "--fusion", "all", "--seed", "3",
                                     "--epochs", "2", "--workdir", "w",
                                     "--modalities", "text,image"])
    assert isinstance(config, smoke.SmokeConfig)
    assert (config.fusion, config.seed, config.epochs, config.workdir, config.quick) == (
        "all", 3, 2, "w", True)
    assert config.modalities == ("image", "text")
    assert config.mesh is None and not args.distributed
    config, _ = smoke.parse_args(["--distributed", "--num-processes", "2"])
    assert config.mesh == "auto" and not config.quick
    with pytest.raises(Exception, match="frozen|cannot assign"):
        config.seed = 1


def test_bad_names_fail_before_compute(smoke, tmp_path):
    with pytest.raises(ValueError, match="Unrecognized fusion: 'nope'.*concat"):
        smoke.main(["--quick", "--fusion", "nope", "--workdir", str(tmp_path)])
    with pytest.raises(ValueError, match="modalities"):
        smoke.quick_config(modalities=("video",))
    assert not list(tmp_path.iterdir())


def test_synthetic_data_is_seeded_and_carries_a_class_signal(smoke):
    config = smoke.quick_config(num_train=512)
    a, b = smoke.make_data(config, "train"), smoke.make_data(config, "train")
    np.testing.assert_array_equal(a["image"], b["image"])
    other = smoke.make_data(smoke.quick_config(seed=1), "train")
    assert not np.array_equal(a["label"][:64], other["label"][:64])
    y = a["label"]
    assert a["text"][0].dtype == np.int32 and a["audio"][1].dtype == bool
    for m in config.modalities:
        assert a["present"][m].mean() > 0.7
    assert np.all(np.any(np.stack(list(a["present"].values())), axis=0))
    # each modality alone predicts the class far above chance (0.25) with a trivial rule
    ids, mask = a["text"]
    text_guess = np.array([np.bincount(r[m][r[m] < 4], minlength=4).argmax()
                           for r, m in zip(ids, mask, strict=True)])
    assert np.mean(text_guess == y) > 0.5
    log_mel = a["audio"][0]
    bands = np.stack([log_mel[..., k * 4:(k + 1) * 4].sum(axis=(1, 2)) for k in range(4)], 1)
    assert np.mean(bands.argmax(1) == y) > 0.5


def test_quick_run_writes_results(smoke, tmp_path):
    config = smoke.quick_config(fusion="concat", modalities=("image", "text"), epochs=2,
                                num_train=96, num_eval=64, workdir=str(tmp_path))
    results = smoke.run(config)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metrics"] == results["metrics"]
    assert {"config", "metrics", "wall_time_s", "num_params"} <= set(saved)
    assert saved["config"]["fusion"] == "concat" and saved["num_params"] > 0
    assert 0.0 <= saved["metrics"]["accuracy"] <= 1.0
    assert (tmp_path / "curves.png").exists() and (tmp_path / "log.jsonl").exists()
    again = smoke.run(config)  # re-running the same command resumes (nothing left to do)
    assert again["resumed_from"] == results["steps"]
    assert again["metrics"] == results["metrics"]
