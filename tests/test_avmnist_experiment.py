"""experiments/avmnist.py: config, validation, robustness, and the quick mode end to end."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def avmnist():
    name = "_lepton_avmnist_experiment"
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / "avmnist.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


def test_argparse_converts_to_a_typed_config(avmnist):
    config = avmnist.parse_args(["--fusion", "all", "--seeds", "0,1,2", "--workdir", "w",
                                 "--data-seed", "3", "--epochs", "2"])
    assert isinstance(config, avmnist.AVMNISTConfig)
    assert (config.seeds, config.data_seed, config.epochs, config.workdir) == (
        (0, 1, 2), 3, 2, "w")
    assert config.snr_sweep == (20, 10, 0, -5, -10, -15, -20) and config.robustness
    assert config.image_noise_sweep[0] == 0.0 and config.modality_dropout == 0.0
    from lepton_mm.fusion import FUSIONS

    assert avmnist.resolve_methods(config) == ["image_only", "audio_only", *sorted(FUSIONS)]
    quick = avmnist.parse_args(["--quick", "--seed", "4"])
    assert quick.quick and quick.seeds == (4,) and quick.num_train == 12000
    assert quick.snr_db == -15.0 and quick.progress is True  # the benchmark; bars shown
    assert avmnist.resolve_methods(quick) == list(avmnist.QUICK_METHODS)
    assert avmnist.parse_args(["--quick", "--no-progress"]).progress is False
    with pytest.raises(Exception, match="frozen|cannot assign"):
        config.epochs = 1
    sweeps = avmnist.parse_args(["--snr-sweep=10,-20", "--image-noise", "0,1",
                                 "--no-robustness"])
    assert (sweeps.snr_sweep, sweeps.image_noise_sweep, sweeps.robustness) == (
        (10.0, -20.0), (0.0, 1.0), False)


def test_modality_dropout_runs_get_their_own_method_keys(avmnist):
    config = avmnist.parse_args(["--fusion", "image_only,concat,gated",
                                 "--modality-dropout", "0.3"])
    assert avmnist.resolve_methods(config) == [
        "image_only", "concat", "concat+mdrop", "gated", "gated+mdrop"]
    assert avmnist.split_method("gated+mdrop") == ("gated", True)
    plain, mdrop = avmnist._run_key(config, "concat"), avmnist._run_key(config, "concat+mdrop")
    # Plain runs keep the key they had before the option existed (finished runs reused).
    assert "modality_dropout" not in plain and mdrop == {**plain, "modality_dropout": 0.3}
    assert plain == avmnist._run_key(avmnist.AVMNISTConfig(
        methods=("image_only", "concat", "gated"), workdir="runs/avmnist"))


def test_bad_names_fail_before_compute(avmnist, tmp_path):
    with pytest.raises(ValueError, match="Unrecognized method: 'nope'.*concat"):
        avmnist.main(["--quick", "--fusion", "concat,nope", "--workdir", str(tmp_path)])
    with pytest.raises(ValueError, match="seeds"):
        avmnist.AVMNISTConfig(seeds=(1, 1))
    with pytest.raises(ValueError, match="modality_dropout"):
        avmnist.AVMNISTConfig(modality_dropout=1.0)
    with pytest.raises(ValueError, match="snr_sweep.*decreasing"):
        avmnist.AVMNISTConfig(snr_sweep=(-20.0, 0.0))
    with pytest.raises(ValueError, match="image_noise_sweep"):
        avmnist.AVMNISTConfig(image_noise_sweep=(0.5,))
    assert not list(tmp_path.iterdir())


def test_a_run_with_other_settings_is_not_resumed(avmnist, tmp_path):
    config = avmnist.quick_config(workdir=str(tmp_path))
    run_dir = tmp_path / "concat" / "seed_0"
    run_dir.mkdir(parents=True)
    old = {**avmnist._run_key(config), "snr_db": 0.0, "epochs": 3}  # epochs may change
    (run_dir / "run_key.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"different \['snr_db'\]"):
        avmnist.run_one(config, "concat", 0, None, run_dir)


def test_condition_evaluator_equals_the_model(avmnist):
    """Cached encoders + presence flags give exactly ``argmax(model(batch))``."""
    import jax.numpy as jnp
    from flax import nnx

    from lepton_mm.encoders import AudioSpectrogramCNN, ImageCNN
    from lepton_mm.fusion import build
    from lepton_mm.models import MultimodalClassifier
    from lepton_mm.robustness import mark_absent

    rngs = nnx.Rngs(0)
    model = MultimodalClassifier(
        {"image": ImageCNN(1, dim=8, widths=(4,), rngs=rngs),
         "audio": AudioSpectrogramCNN(16, dim=8, widths=(4,), rngs=rngs)},
        build("gated", {"image": 8, "audio": 8}, 6, rngs=rngs), nnx.Linear(6, 10, rngs=rngs))
    model.eval()
    rng = np.random.default_rng(0)
    n = 13  # not a multiple of the batch size: the last chunk is padded
    batch = {"image": rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
             "audio": (rng.normal(size=(n, 20, 16)).astype(np.float32),
                       np.arange(20)[None, :] < rng.integers(4, 20, (n, 1))),
             "label": np.zeros(n, np.int32)}
    evaluator = avmnist.ConditionEvaluator(model, batch_size=8)
    for condition in (batch, mark_absent(batch, "audio"), mark_absent(batch, "image")):
        expected = np.asarray(jnp.argmax(model(condition), -1))
        labels = expected.copy()
        labels[:5] = (labels[:5] + 1) % 10  # 8 of 13 correct
        assert evaluator.accuracy({**condition, "label": labels}) == pytest.approx(8 / 13)


def _check_summary(results, methods, sweeps):
    assert set(results) == set(methods)
    for method, r in results.items():
        acc = r["test_accuracy"]
        assert set(acc) == {"mean", "std", "per_seed"}
        assert set(acc["per_seed"]) == {"0"} and acc["std"] is None
        assert acc["mean"] == acc["per_seed"]["0"]
        assert r["num_params"] > 0 and r["epoch_time_s"] > 0 and r["peak_rss_mb"] > 0
        fused = method not in ("image_only", "audio_only")
        assert (r["audio_absent"] is not None) == fused
        assert (r["image_absent"] is not None) == fused
        assert (r["audio_snr"] is not None) == (method != "image_only")
        assert (r["image_noise"] is not None) == (method != "audio_only")
        for sweep, levels in sweeps.items():
            if r[sweep] is not None:
                assert r[sweep]["levels"] == list(levels)
                assert len(r[sweep]["mean"]) == len(levels)
                assert 0 <= r[sweep]["relative_robustness"]["mean"] <= 1
                assert r[sweep]["effective_robustness"] is not None
    for sweep in sweeps:  # the reference (concat) scores 0 against itself
        assert results["concat"][sweep]["effective_robustness"]["mean"] == pytest.approx(0)


def test_quick_mode_fusion_beats_both_modalities(avmnist, tmp_path):
    # The quick pipeline at the benchmark's -15 dB on half of --quick's training subset:
    # the first 6000 training examples, one epoch of 375 steps (batch 16), robustness
    # on two levels per sweep. Measured on 2 busy CPU cores (seed 0, data seed 0;
    # test / validation accuracy, %): image 52.0 / 56.0, audio 30.2 / 30.8, concat
    # 57.8 / 57.7 (with 150 steps of batch 40 concat was below the image alone).
    # Runs are deterministic on a given machine and JAX version.
    sweeps = {"audio_snr": (0.0, -15.0), "image_noise": (0.0, 0.5)}
    config = avmnist.quick_config(
        methods=("image_only", "audio_only", "concat"), num_train=6000, num_val=500,
        num_test=2000, workdir=str(tmp_path), progress=False,
        snr_sweep=sweeps["audio_snr"], image_noise_sweep=sweeps["image_noise"])
    assert config.snr_db == -15.0
    summary = avmnist.run(config)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results == json.loads(json.dumps(summary))
    _check_summary(results, ("image_only", "audio_only", "concat"), sweeps)
    for method in results:
        stored = json.loads((tmp_path / method / "seed_0" / "result.json").read_text())
        rob = stored["robustness"]
        assert rob["both"] == pytest.approx(stored["test_accuracy"], abs=1e-3)
        if method != "image_only":  # the sweep's -15 dB point is the test split itself
            assert rob["audio_snr"][1] == rob["both"]
    acc = {m: r["test_accuracy"]["mean"] for m, r in results.items()}
    assert acc["image_only"] > 0.3 and acc["audio_only"] > 0.2  # both learn (chance 0.1)
    assert acc["concat"] > max(acc["image_only"], acc["audio_only"]), acc
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("| method |") and "| concat |" in table
    assert "audio absent (%)" in table and "**Audio SNR sweep**" in table
    for name in ("audio_snr_sweep.png", "image_noise_sweep.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"

    # Re-running finds every run finished: no training (no log is touched), same table.
    logs = sorted(tmp_path.glob("*/seed_0/log.jsonl"))
    assert len(logs) == 3
    before = [(p.stat().st_mtime_ns, p.read_bytes()) for p in logs]
    assert avmnist.run(config) == summary
    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in logs] == before

    # A finished run without robustness results gets them from its best checkpoint,
    # without training: the same numbers, the training log untouched.
    path = tmp_path / "concat" / "seed_0" / "result.json"
    stored = json.loads(path.read_text())
    log = (tmp_path / "concat" / "seed_0" / "log.jsonl").read_text()
    path.write_text(json.dumps({k: v for k, v in stored.items() if k != "robustness"}))
    again = avmnist.run(config)
    restored = json.loads(path.read_text())["robustness"]
    for key in ("both", "audio_absent", "image_absent", "audio_snr", "image_noise"):
        assert restored[key] == pytest.approx(stored["robustness"][key], abs=1e-3), key
    assert (tmp_path / "concat" / "seed_0" / "log.jsonl").read_text() == log
    assert again["concat"]["test_accuracy"] == summary["concat"]["test_accuracy"]


def test_modality_dropout_trains_a_separate_run(avmnist, tmp_path):
    config = avmnist.quick_config(
        methods=("concat",), num_train=64, num_val=32, num_test=32, epochs=1,
        modality_dropout=0.5, workdir=str(tmp_path), progress=False,
        snr_sweep=(0.0, -15.0), image_noise_sweep=(0.0, 1.0))
    summary = avmnist.run(config)
    assert list(summary) == ["concat", "concat+mdrop"]
    assert summary["concat"]["modality_dropout"] == 0.0
    assert summary["concat+mdrop"]["modality_dropout"] == 0.5
    from lepton_mm.training import Checkpointer

    meta = Checkpointer(tmp_path / "concat+mdrop" / "seed_0", read_only=True).read_meta()
    assert meta["config"]["modality_dropout"] == 0.5
    table = (tmp_path / "results.md").read_text()
    assert "| concat+mdrop |" in table
