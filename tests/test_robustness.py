"""lepton_mm.robustness: absence flags, seeded noise and MultiBench's robustness scores."""

import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_mm import robustness
from lepton_mm.robustness import (
    ConditionEvaluator,
    add_gaussian_noise,
    effective_robustness,
    mark_absent,
    minmax_normalize,
    relative_robustness,
)


def _batch(n=4):
    return {"image": np.ones((n, 6, 6, 1), np.float32),
            "audio": (np.ones((n, 10, 8), np.float32), np.ones((n, 10), bool)),
            "label": np.arange(n, dtype=np.int32) % 3}


def test_docstring_examples_run():
    results = doctest.testmod(robustness, optionflags=doctest.ELLIPSIS, verbose=False)
    assert results.attempted > 0 and results.failed == 0


def test_mark_absent_sets_flags_and_leaves_the_input_alone():
    batch = _batch()
    batch["present"] = {"image": np.array([True, False, True, True])}
    out = mark_absent(batch, ["audio"])
    assert out is not batch and out["present"] is not batch["present"]
    assert set(batch["present"]) == {"image"}  # not modified
    np.testing.assert_array_equal(out["present"]["audio"], np.zeros(4, bool))
    assert out["present"]["audio"].dtype == bool and out["present"]["audio"].shape == (4,)
    np.testing.assert_array_equal(out["present"]["image"], [True, False, True, True])
    assert out["audio"] is batch["audio"] and out["image"] is batch["image"]  # no copies
    both = mark_absent(batch, ("audio", "image"))
    assert not both["present"]["audio"].any() and not both["present"]["image"].any()
    assert mark_absent(batch, "image")["present"]["image"].tolist() == [False] * 4


@pytest.mark.parametrize("name, match", [
    ("text", r"Unrecognized modality: 'text'. The batch has modalities \['audio', 'image'\]"),
    ("label", "reserved batch key"),
    ("present", "reserved batch key"),
])
def test_mark_absent_rejects_unknown_modalities(name, match):
    with pytest.raises(ValueError, match=match):
        mark_absent(_batch(), [name])


def test_mark_absent_rejects_bad_batches():
    with pytest.raises(TypeError, match="batch"):
        mark_absent([1, 2], "audio")
    with pytest.raises(TypeError, match="present"):
        mark_absent({**_batch(), "present": [True]}, "audio")


def test_absence_through_the_model_equals_a_missing_modality():
    """A model fed ``mark_absent(batch, "audio")`` ignores the audio values entirely."""
    from flax import nnx

    from lepton_mm.encoders import AudioSpectrogramCNN, ImageCNN
    from lepton_mm.fusion import build
    from lepton_mm.models import MultimodalClassifier

    rngs = nnx.Rngs(0)
    encoders = {"image": ImageCNN(1, dim=8, widths=(4,), rngs=rngs),
                "audio": AudioSpectrogramCNN(8, dim=8, widths=(4,), rngs=rngs)}
    model = MultimodalClassifier(
        encoders, build("concat", {"image": 8, "audio": 8}, 6, rngs=rngs),
        nnx.Linear(6, 3, rngs=rngs))
    batch = _batch()
    other = {**batch, "audio": (np.full((4, 10, 8), 7.0, np.float32), batch["audio"][1])}
    a = model(mark_absent(batch, "audio"))
    b = model(mark_absent(other, "audio"))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(model(batch), model(other))


def _bimodal_model(seed=0):
    """Image + audio encoders (batch norm), concat with dropout, 3 classes; train mode."""
    from flax import nnx

    from lepton_mm.encoders import AudioSpectrogramCNN, ImageCNN
    from lepton_mm.fusion import build
    from lepton_mm.models import MultimodalClassifier

    rngs = nnx.Rngs(seed)
    encoders = {"image": ImageCNN(1, dim=8, widths=(4,), rngs=rngs),
                "audio": AudioSpectrogramCNN(8, dim=8, widths=(4,), rngs=rngs)}
    return MultimodalClassifier(
        encoders, build("concat", {"image": 8, "audio": 8}, 6, hidden=(6,), dropout=0.5,
                        rngs=rngs),
        nnx.Linear(6, 3, rngs=rngs))


def _random_batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, 6, 6, 1)).astype(np.float32),
            "audio": (rng.normal(size=(n, 10, 8)).astype(np.float32),
                      np.arange(10)[None, :] < rng.integers(2, 11, (n, 1))),
            "label": np.zeros(n, np.int32)}


def _train_flags(model):
    from flax import nnx

    return [m.use_running_average for _, m in nnx.iter_modules(model)
            if hasattr(m, "use_running_average")]


def test_condition_evaluator_equals_the_model_under_every_condition():
    model = _bimodal_model()
    n = 13  # not a multiple of batch_size: the last chunk is padded with repeats
    batch = _random_batch(n)
    evaluator = ConditionEvaluator(model, batch_size=5)
    assert _train_flags(model) and not any(_train_flags(model))  # caller's model untouched
    model.eval()  # the reference: the model's own forward pass in eval mode
    rng = np.random.default_rng(1)
    mixed = {**batch, "present": {"audio": rng.random(n) < 0.5,
                                  "image": rng.random(n) < 0.5}}
    noisy = {**batch, "image": batch["image"] + rng.normal(size=batch["image"].shape)
             .astype(np.float32)}
    conditions = {"both": batch, "audio_absent": mark_absent(batch, "audio"),
                  "image_absent": mark_absent(batch, "image"), "mixed": mixed,
                  "noisy_image": noisy, "noisy_audio_absent": mark_absent(noisy, "audio")}
    for name, condition in conditions.items():
        expected = np.asarray(jnp.argmax(model(condition), axis=-1))
        preds = evaluator.predictions(condition)
        assert preds.shape == (n,) and np.issubdtype(preds.dtype, np.integer), name
        np.testing.assert_array_equal(preds, expected, err_msg=name)
        labels = expected.copy()
        labels[:4] = (labels[:4] + 1) % 3  # exactly 9 of 13 correct
        assert evaluator.accuracy({**condition, "label": labels}) == pytest.approx(
            9 / 13), name
    # The conditions do change the predictions (else the test could not fail).
    assert len({evaluator.predictions(c).tobytes() for c in conditions.values()}) > 2


def test_condition_evaluator_encodes_each_input_once():
    model = _bimodal_model()
    batch = _random_batch(7)
    evaluator = ConditionEvaluator(model, batch_size=4)
    calls = []
    encode = evaluator._encode

    def counting(*args, modality):
        calls.append(modality)
        return encode(*args, modality=modality)

    evaluator._encode = counting
    first = evaluator.predictions(batch)
    assert sorted(calls) == ["audio", "audio", "image", "image"]  # 2 chunks each
    calls.clear()
    evaluator.accuracy(mark_absent(batch, ["audio", "image"]))
    np.testing.assert_array_equal(evaluator.predictions(batch), first)
    assert calls == []  # the same arrays: no encoder re-runs
    evaluator.predictions({**batch, "image": batch["image"] + 1})
    assert calls == ["image", "image"]
    calls.clear()
    log_mel, mask = batch["audio"]
    evaluator.predictions({**batch, "audio": (log_mel, mask.copy())})  # any new leaf
    assert calls == ["audio", "audio"]


def test_condition_evaluator_unimodal_model_and_errors():
    from flax import nnx

    from lepton_mm.encoders import ImageCNN
    from lepton_mm.models import MultimodalClassifier

    rngs = nnx.Rngs(0)
    model = MultimodalClassifier({"image": ImageCNN(1, dim=8, widths=(4,), rngs=rngs)},
                                 None, nnx.Linear(8, 4, rngs=rngs))
    model.eval()
    batch = _random_batch(3)  # the audio is ignored; batch_size > n is fine
    evaluator = ConditionEvaluator(model, batch_size=8)
    np.testing.assert_array_equal(evaluator.predictions(batch),
                                  np.asarray(jnp.argmax(model(batch), axis=-1)))
    with pytest.raises(TypeError, match="MultimodalClassifier"):
        ConditionEvaluator(model.encoders["image"], batch_size=8)
    with pytest.raises(ValueError, match="batch_size"):
        ConditionEvaluator(model, batch_size=0)
    with pytest.raises(ValueError, match="missing modality 'image'"):
        evaluator.predictions({"audio": batch["audio"], "label": batch["label"]})
    with pytest.raises(ValueError, match="label"):
        evaluator.accuracy({"image": batch["image"]})
    with pytest.raises(ValueError, match="label"):
        evaluator.accuracy({**batch, "label": np.zeros(2, np.int32)})
    with pytest.raises(ValueError, match="at least one example"):
        evaluator.predictions({"image": batch["image"][:0]})


def test_gaussian_noise_is_seeded_per_example():
    key = jax.random.key(3)
    x = jnp.zeros((5, 4, 4, 1))
    a = add_gaussian_noise(x, 1.0, key=key)
    assert a.shape == x.shape and a.dtype == x.dtype
    np.testing.assert_array_equal(a, add_gaussian_noise(x, 1.0, key=key))  # deterministic
    # Row i depends on (key, example_index[i]) only: any subset or order gives its rows.
    sub = add_gaussian_noise(x[:2], 1.0, key=key, example_index=np.array([3, 1]))
    np.testing.assert_array_equal(sub, a[np.array([3, 1])])
    # One draw, scaled by sigma; shifted by x.
    half = add_gaussian_noise(x + 2.0, 0.5, key=key)
    np.testing.assert_allclose(half, 2.0 + 0.5 * a, rtol=1e-6)
    np.testing.assert_array_equal(add_gaussian_noise(x, 0.0, key=key), x)
    assert not np.array_equal(a, add_gaussian_noise(x, 1.0, key=jax.random.key(4)))
    big = add_gaussian_noise(jnp.zeros((200, 28, 28, 1)), 0.3, key=key)
    assert abs(float(jnp.std(big)) - 0.3) < 0.005 and abs(float(jnp.mean(big))) < 0.005


@pytest.mark.parametrize("kwargs, error", [
    ({"sigma": -0.1}, ValueError), ({"sigma": math.nan}, ValueError),
    ({"sigma": "1"}, TypeError), ({"sigma": 1.0, "example_index": np.arange(3)}, ValueError),
])
def test_gaussian_noise_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error):
        add_gaussian_noise(jnp.zeros((2, 3)), key=jax.random.key(0), **kwargs)
    with pytest.raises(ValueError, match="float"):
        add_gaussian_noise(jnp.zeros((2, 3), jnp.int32), 1.0, key=jax.random.key(0))


def test_relative_robustness_hand_computed():
    # MultiBench: sum_i (a_i + a_{i+1}) * 0.1 / 2 over 11 levels 0, 0.1, ..., 1.
    curve = [0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1]
    expected = sum((curve[i] + curve[i + 1]) * 0.1 / 2 for i in range(10))
    assert relative_robustness(curve) == pytest.approx(expected, abs=1e-12)
    assert relative_robustness(curve, spacing=0.1) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.5)  # by hand: 0.1 * (0.9/2 + 4.5 + 0.1/2)
    # 7 levels: spacing 1/6, the mean of the trapezoids.
    assert relative_robustness([0.6] * 7) == pytest.approx(0.6)
    assert relative_robustness([1.0, 0.0], spacing=2.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2"):
        relative_robustness([0.5])
    with pytest.raises(ValueError, match="spacing"):
        relative_robustness([0.5, 0.4], spacing=0.0)
    with pytest.raises(ValueError, match="finite"):
        relative_robustness([0.5, math.nan])


def test_effective_robustness_hand_computed():
    # beta = lf + (f0 - lf0) = [0.7, 0.6, 0.4, 0.2] + 0.1; f - beta = [0, 0.05, 0, -0.1]
    f = [0.8, 0.75, 0.5, 0.2]
    lf = [0.7, 0.6, 0.4, 0.2]
    assert effective_robustness(f, lf) == pytest.approx(-0.05, abs=1e-12)
    assert effective_robustness(lf, lf) == 0.0
    # A constant curve against a falling reference gains exactly the reference's drops.
    assert effective_robustness([0.5] * 4, lf) == pytest.approx(0.1 + 0.3 + 0.5)
    # Shifting a curve up or down leaves it unchanged (it only measures the drops).
    assert effective_robustness(np.array(f) - 0.3, lf) == pytest.approx(-0.05)
    with pytest.raises(ValueError, match="levels"):
        effective_robustness(f, lf[:3])


def test_minmax_normalize_hand_computed():
    assert minmax_normalize({"a": 1.0, "b": 3.0, "c": 2.5}) == {"a": 0.0, "b": 1.0,
                                                                  "c": 0.75}
    assert minmax_normalize({"a": 1.0, "b": 3.0}, higher_is_better=False) == {
        "a": 1.0, "b": 0.0}
    assert all(math.isnan(v) for v in minmax_normalize({"a": 0.2, "b": 0.2}).values())
    with pytest.raises(ValueError):
        minmax_normalize({})


def test_condition_evaluator_evaluate_matches_one_condition_at_a_time():
    model = _bimodal_model()
    batch = _random_batch(9)
    batch["label"] = np.arange(9, dtype=np.int32) % 3
    evaluator = ConditionEvaluator(model, batch_size=4)
    noisy = [batch["image"] + s * np.ones_like(batch["image"]) for s in (0.0, 2.0, 5.0)]
    out = evaluator.evaluate(batch, absent=("audio",), sweeps={"shift": ("image", noisy)},
                             progress=False)
    assert set(out) == {"clean", "audio_absent", "shift", "predictions"}
    np.testing.assert_array_equal(out["predictions"], evaluator.predictions(batch))
    assert out["clean"] == evaluator.accuracy(batch)
    assert out["audio_absent"] == evaluator.accuracy(mark_absent(batch, "audio"))
    assert out["shift"] == [evaluator.accuracy({**batch, "image": x}) for x in noisy]
    assert out["shift"][0] == out["clean"]


def test_summarize_sweeps_hand_computed():
    curves = {"ref": {"0": [0.9, 0.5], "1": [0.7, 0.5]},   # mean curve [0.8, 0.5]
              "m": {"0": [0.8, 0.6], "1": [0.8, 0.8]}}
    out = robustness.summarize_sweeps(curves, [0.0, 1.0], reference="ref")
    m = out["m"]
    assert m["levels"] == [0.0, 1.0] and m["mean"] == pytest.approx([0.8, 0.7])
    assert m["std"] == pytest.approx([0.0, math.sqrt(0.02)])  # sample std per level
    # relative: area under the curve with levels on [0, 1] (trapezoid): (a0 + a1) / 2
    assert m["relative_robustness"]["per_seed"] == pytest.approx({"0": 0.7, "1": 0.8})
    assert m["relative_robustness"]["mean"] == pytest.approx(0.75)
    # effective: sum of (curve - reference shifted to the curve's start)
    assert m["effective_robustness"]["per_seed"] == pytest.approx(
        {"0": (0.8 - 0.8) + (0.6 - 0.5), "1": (0.8 - 0.8) + (0.8 - 0.5)})
    assert out["ref"]["effective_robustness"]["mean"] == pytest.approx(0.0)
    # min-max over the two methods: the better is 1, the worse 0
    assert (m["relative_robustness_normalized"], out["ref"]["relative_robustness_normalized"]
            ) == (1.0, 0.0)
    alone = robustness.summarize_sweeps({"m": curves["m"]}, [0.0, 1.0], reference="ref")
    assert alone["m"]["effective_robustness"] is None
    assert alone["m"]["relative_robustness_normalized"] is None  # one method: undefined
    with pytest.raises(ValueError, match="expected 2 accuracies"):
        robustness.summarize_sweeps({"m": {"0": [0.1, 0.2, 0.3]}}, [0.0, 1.0])


def test_plot_sweep_writes_a_png(tmp_path):
    sweep = {"a": {"levels": [0, 1], "mean": [0.8, 0.4], "std": [0.01, 0.02]},
             "a+mdrop": {"levels": [0, 1], "mean": [0.7, 0.5], "std": None}}
    path = robustness.plot_sweep(sweep, tmp_path / "s.png", xlabel="x", title="t",
                                 invert_x=True, mark=(0.5, "train"),
                                 group=lambda m: (m.split("+")[0], "+" in m))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Several variants of a method: one line style each, in the method's colour.
    sweep["a+snr_range"] = {"levels": [0, 1], "mean": [0.8, 0.7], "std": None}
    path = robustness.plot_sweep(sweep, tmp_path / "v.png", xlabel="x", title="t",
                                 group=lambda m: m.partition("+")[::2])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
