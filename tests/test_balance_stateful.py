"""lepton_mm.balance.PMR (a stateful strategy): prototypes, distances, the prototype
classifier's losses, the imbalance ratio and coefficients against hand-computed values
on a constructed batch; the prototypes advancing step by step; fit(strategy=PMR(...))
resuming bit for bit (mid-epoch too); bad settings named."""

import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_training_loop import BATCH, Frames, make_data, make_model, params_of

from lepton_mm.balance import (
    PMR,
    PMRState,
    class_means,
    pmr_coefficients,
    prototype_logits,
    update_prototypes,
)
from lepton_mm.encoders import ImageCNN
from lepton_mm.models import Classification, Regression, build_classifier
from lepton_mm.training import OptimizerConfig, fit, read_log, seed_rngs
from lepton_mm.types import EncoderOutput

# A constructed batch: 2-d features of two modalities, 3 classes, 4 rows; row 3 is
# padding (valid False) and row 2 lacks audio.
LABELS = np.array([0, 1, 2, 0], np.int32)
VALID = np.array([True, True, True, False])
AUDIO_PRESENT = np.array([True, True, False, True])
Z = {"audio": np.array([[0.0, 0.0], [3.0, 4.0], [9.0, 9.0], [1.0, 1.0]], np.float32),
     "image": np.array([[1.0, 0.0], [0.0, 2.0], [2.0, 2.0], [5.0, 5.0]], np.float32)}
C = {"audio": np.array([[0.0, 1.0], [3.0, 0.0], [0.0, 0.0]], np.float32),
     "image": np.array([[1.0, 0.0], [0.0, 2.0], [2.0, 1.0]], np.float32)}


def _distances(z, c):
    return np.sqrt(((z[:, None, :] - c[None, :, :]) ** 2).sum(-1))


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_prototype_logits_are_minus_euclidean_distances():
    logits = prototype_logits(Z["audio"], C["audio"])
    np.testing.assert_allclose(logits, -_distances(Z["audio"], C["audio"]), rtol=1e-6)
    assert float(logits[1, 1]) == -4.0 and float(logits[0, 2]) == 0.0  # sqrt(0 + 16); 0
    # At zero distance the gradient is 0, not NaN (sqrt's derivative at 0).
    grad = jax.grad(lambda z: prototype_logits(z, C["audio"])[0, 2])(jnp.asarray(Z["audio"]))
    assert np.all(np.isfinite(grad)) and float(jnp.abs(grad).sum()) == 0.0
    with pytest.raises(ValueError, match="features, prototypes: expected"):
        prototype_logits(Z["audio"], C["audio"][:, :1])


def test_class_means_count_only_the_selected_rows():
    rows = VALID & AUDIO_PRESENT  # rows 0 and 1
    z = Z["audio"].copy()
    z[3] = np.nan  # an unselected row's NaN does not leak
    means, counts = class_means(z, LABELS, rows, num_classes=3)
    np.testing.assert_array_equal(counts, [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(means, [[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])


def test_prototypes_start_at_the_class_mean_then_average_and_skip_absent_classes():
    c0, seen0 = jnp.zeros((3, 2)), jnp.zeros((3,), bool)
    rows = VALID & AUDIO_PRESENT
    c1, seen1 = update_prototypes(c0, seen0, Z["audio"], LABELS, rows, momentum=0.8)
    # First sight: the class mean itself; class 2 has no row (absent, padding): unseen.
    np.testing.assert_array_equal(c1, [[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_array_equal(seen1, [True, True, False])
    z2 = np.array([[2.0, 2.0], [4.0, 0.0], [1.0, 3.0], [7.0, 7.0]], np.float32)
    labels2 = np.array([0, 0, 2, 1], np.int32)
    rows2 = np.array([True, True, True, False])
    c2, seen2 = update_prototypes(c1, seen1, z2, labels2, rows2, momentum=0.8)
    # class 0: 0.8 * (0, 0) + 0.2 * mean((2, 2), (4, 0)) = (0.6, 0.2); class 1 has no
    # row (row 3 is not counted): unchanged; class 2 first seen: (1, 3).
    np.testing.assert_allclose(c2, [[0.6, 0.2], [3.0, 4.0], [1.0, 3.0]], rtol=1e-6)
    np.testing.assert_array_equal(seen2, [True, True, True])
    with pytest.raises(ValueError, match=r"momentum: expected a number in \[0, 1\)"):
        update_prototypes(c0, seen0, Z["audio"], LABELS, rows, momentum=1.0)


def test_ratio_and_coefficients_by_hand():
    scores = {"a": np.array([0.9, 0.5, 0.1]), "v": np.array([0.3, 0.2, 0.7])}
    rows = {"a": np.array([True, True, False]), "v": np.array([True, True, True])}
    beta, gamma, rho = pmr_coefficients(scores, alpha=2.0, mu=0.3, rows=rows)
    mean_a, mean_v = (0.9 + 0.5) / 2, (0.3 + 0.2 + 0.7) / 3  # each over its own rows
    rho_a = mean_a / mean_v  # 1.75
    assert float(rho["a"]) == pytest.approx(rho_a, rel=1e-6)
    assert float(rho["v"]) == pytest.approx(1 / rho_a, rel=1e-6)
    assert float(beta["v"]) == pytest.approx(2.0 * min(rho_a - 1, 1), rel=1e-6)  # 1.5
    assert float(gamma["a"]) == pytest.approx(0.3 * min(rho_a - 1, 1), rel=1e-6)  # 0.225
    assert float(beta["a"]) == 0.0 and float(gamma["v"]) == 0.0
    # Far apart: both clipped at 1.
    beta, gamma, _ = pmr_coefficients({"a": np.array([0.9]), "v": np.array([0.1])},
                                      alpha=2.0, mu=0.3)
    assert float(beta["v"]) == pytest.approx(2.0) and float(gamma["a"]) == pytest.approx(0.3)
    # Three modalities: against the mean of the others' means.
    beta3, gamma3, rho3 = pmr_coefficients(
        {"a": np.array([0.8]), "b": np.array([0.4]), "c": np.array([0.2])}, alpha=1.0, mu=1.0)
    assert float(rho3["a"]) == pytest.approx(0.8 / 0.3, rel=1e-6)
    assert float(gamma3["a"]) == pytest.approx(1.0)  # rho - 1 = 1.67, clipped
    assert float(beta3["b"]) == pytest.approx(0.5 / 0.4 - 1, rel=1e-6)  # others: 0.5
    assert float(beta3["c"]) == pytest.approx(1.0)  # 0.6 / 0.2 - 1 = 2, clipped
    with pytest.raises(ValueError, match="mu: expected a finite number >= 0"):
        pmr_coefficients(scores, alpha=1.0, mu=-0.1)
    with pytest.raises(ValueError, match="scores: expected two or more"):
        pmr_coefficients({"a": scores["a"]}, alpha=1.0, mu=0.0)


class _Features:
    """A stand-in for fit's ``forward``: ``encode`` returns the given pooled features."""

    def __init__(self, features):
        self.features = features

    def encode(self, batch):
        del batch
        return {u: EncoderOutput(z[:, None, :], jnp.ones((z.shape[0], 1), bool), z)
                for u, z in self.features.items()}


def _batch():
    return {"label": LABELS, "valid": VALID, "present": {"audio": AUDIO_PRESENT}}


def _state(seen=True):
    return PMRState(prototypes={u: jnp.asarray(c) for u, c in C.items()},
                    seen={u: jnp.full((3,), seen) for u in C})


def test_pmr_objective_metrics_and_state_on_a_constructed_batch():
    strategy = PMR(alpha=2.0, mu=0.5, momentum=0.75)
    loss = jnp.float32(1.25)
    objective, metrics, new = strategy.loss(_Features(Z), None, _batch(), None, loss,
                                            jax.random.key(0), jnp.int32(4), _state())
    # By hand, in float64: each modality's prototype classifier over its rows.
    rows = {"audio": VALID & AUDIO_PRESENT, "image": VALID}
    pce, ent, mean_score = {}, {}, {}
    for u in ("audio", "image"):
        logp = _log_softmax(-_distances(Z[u].astype(np.float64), C[u].astype(np.float64)))
        true = logp[np.arange(4), LABELS]
        r = rows[u]
        pce[u] = -true[r].mean()
        ent[u] = -(np.exp(logp) * logp).sum(-1)[r].mean()
        mean_score[u] = np.exp(true)[r].mean()
    rho_audio = mean_score["audio"] / mean_score["image"]
    assert float(metrics["pmr/ratio_audio"]) == pytest.approx(rho_audio, rel=1e-5)
    weak, strong = ("audio", "image") if rho_audio < 1 else ("image", "audio")
    lead = max(rho_audio, 1 / rho_audio) - 1
    beta, gamma = 2.0 * min(lead, 1.0), 0.5 * min(lead, 1.0)
    assert float(metrics[f"pmr/beta_{weak}"]) == pytest.approx(beta, rel=1e-5)
    assert float(metrics[f"pmr/gamma_{strong}"]) == pytest.approx(gamma, rel=1e-5)
    assert float(metrics[f"pmr/beta_{strong}"]) == 0.0
    assert float(metrics[f"pmr/gamma_{weak}"]) == 0.0
    for u in ("audio", "image"):
        assert float(metrics[f"pmr/pce_{u}"]) == pytest.approx(pce[u], rel=1e-5)
        assert float(metrics[f"pmr/entropy_{u}"]) == pytest.approx(ent[u], rel=1e-5)
    expected = 1.25 + beta * pce[weak] - gamma * ent[strong]
    assert float(objective) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["pmr/ready"]) == 1.0
    # The state advances by update_prototypes over the same rows.
    for u in ("audio", "image"):
        want, seen = update_prototypes(C[u], np.ones(3, bool), Z[u], LABELS, rows[u],
                                       momentum=0.75)
        np.testing.assert_array_equal(new.prototypes[u], want)
        np.testing.assert_array_equal(new.seen[u], seen)
    # e.g. audio's class 0: 0.75 * (0, 1) + 0.25 * (0, 0) (row 3, padding, not counted)
    np.testing.assert_allclose(new.prototypes["audio"][0], [0.0, 0.75])


def test_pmr_terms_reach_only_the_weaker_encoders_features_without_entropy():
    strategy = PMR(alpha=1.0)  # mu = 0: no entropy term

    def objective(features):
        return strategy.loss(_Features(features), None, _batch(), None, jnp.float32(0.0),
                             jax.random.key(0), jnp.int32(0), _state())[0]

    features = {u: jnp.asarray(z) for u, z in Z.items()}
    grads = jax.grad(objective)(features)
    _, metrics, _ = strategy.loss(_Features(features), None, _batch(), None, 0.0,
                                  jax.random.key(0), jnp.int32(0), _state())
    weak = "audio" if float(metrics["pmr/ratio_audio"]) < 1 else "image"
    strong = {"audio": "image", "image": "audio"}[weak]
    assert float(jnp.abs(grads[strong]).sum()) == 0.0  # the dominant one is left alone
    assert float(jnp.abs(grads[weak]).sum()) > 0.0
    assert np.all(np.asarray(grads["audio"])[~(VALID & AUDIO_PRESENT)] == 0)  # unused rows


def test_pmr_is_off_before_every_prototype_exists_and_outside_its_steps():
    args = (_Features(Z), None, _batch(), None, jnp.float32(1.25), jax.random.key(0))
    for strategy, step, state in ((PMR(alpha=1.0, mu=1.0), 0, _state(seen=False)),
                                  (PMR(alpha=1.0, mu=1.0, start_step=5), 4, _state()),
                                  (PMR(alpha=1.0, mu=1.0, end_step=5), 5, _state())):
        objective, metrics, new = strategy.loss(*args, jnp.int32(step), state)
        assert float(objective) == 1.25
        assert all(float(metrics[f"pmr/{c}_{u}"]) == 0.0
                   for c in ("beta", "gamma") for u in ("audio", "image"))
        assert bool(jnp.all(new.seen["image"]))  # the prototypes advance regardless
    # The entropy term can end before the cross-entropy term.
    early = PMR(alpha=1.0, mu=1.0, entropy_end_step=3)
    _, metrics, _ = early.loss(*args, jnp.int32(3), _state())
    assert sum(float(metrics[f"pmr/beta_{u}"]) for u in ("audio", "image")) > 0
    assert all(float(metrics[f"pmr/gamma_{u}"]) == 0.0 for u in ("audio", "image"))


OPT = OptimizerConfig(learning_rate=0.02)
STRATEGY = PMR(alpha=1.0, mu=0.2, momentum=0.5)


def _fit(workdir, epochs, **kw):
    model = make_model(0)
    result = fit(model, Classification(3), make_data(), workdir=workdir, epochs=epochs,
                 batch_size=BATCH, optimizer=OPT, seed=0, strategy=STRATEGY,
                 checkpoint_every=2, keep_checkpoints=5, **kw)
    return model, result


def test_fit_with_pmr_resumes_exactly_mid_epoch(tmp_path):
    straight, result = _fit(tmp_path / "straight", 2)
    state = result.strategy_state
    assert isinstance(state, PMRState) and sorted(state.prototypes) == ["audio", "image"]
    assert state.prototypes["image"].shape == (3, 6)  # ImageCNN(dim=6)
    assert all(bool(np.all(s)) for s in state.seen.values())
    records = [r for r in read_log(tmp_path / "straight" / "log.jsonl") if r["kind"] == "step"]
    assert records[-1]["pmr/ready"] == 1.0 and "pmr/ratio_audio" in records[0]
    assert any(r["pmr/beta_audio"] + r["pmr/beta_image"] > 0 for r in records)
    # Stop after epoch 1 (3 steps: checkpoints at 2, mid-epoch, and 3), drop the epoch
    # end: the re-run resumes from step 2, mid-epoch, prototypes and all.
    _fit(tmp_path / "resumed", 1)
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "3")
    resumed, again = _fit(tmp_path / "resumed", 2)
    assert again.resumed_from == 2
    for a, b in zip(params_of(straight), params_of(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(again.strategy_state),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert again.history == result.history


def test_pmr_under_mixed_precision_keeps_float32_prototypes(tmp_path):
    """forward.encode under compute_dtype: bfloat16 features, float32 out."""
    model = make_model(0)
    result = fit(model, Classification(3), make_data(), workdir=tmp_path, epochs=1,
                 batch_size=BATCH, optimizer=OPT, seed=0, strategy=STRATEGY,
                 compute_dtype=jnp.bfloat16)
    for u in ("audio", "image"):
        prototypes = result.strategy_state.prototypes[u]
        assert prototypes.dtype == np.float32 and np.all(np.isfinite(prototypes))
        assert np.any(prototypes != 0)


def test_bad_pmr_settings_name_the_argument():
    for kwargs, match in (({"alpha": 0.0}, "alpha: expected a finite number > 0"),
                          ({"alpha": math.nan}, "alpha: expected a finite number > 0"),
                          ({"alpha": 1.0, "mu": -0.5}, "mu: expected a finite number >= 0"),
                          ({"alpha": 1.0, "momentum": 1.0}, r"momentum: .*\[0, 1\)"),
                          ({"alpha": 1.0, "momentum": -0.1}, r"momentum: .*\[0, 1\)"),
                          ({"alpha": 1.0, "modalities": ("image",)},
                           "modalities: expected two or more"),
                          ({"alpha": 1.0, "start_step": -1}, "start_step: expected an int"),
                          ({"alpha": 1.0, "start_step": 4, "end_step": 4},
                           r"end_step: expected > start_step \(4\)"),
                          ({"alpha": 1.0, "entropy_end_step": 1.5},
                           "entropy_end_step: expected an int")):
        with pytest.raises(ValueError, match=match):
            PMR(**kwargs)


def test_pmr_of_an_unknown_modality_or_task_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"strategy: PMR modalities.*'depth'"):
        fit(make_model(0), Classification(3), make_data(), workdir=tmp_path / "a",
            batch_size=BATCH, strategy=PMR(alpha=1.0, modalities=("image", "depth")))
    rngs = seed_rngs(0)  # a regressor: one output, float labels
    regressor = build_classifier({"image": ImageCNN(1, dim=6, widths=(4,), rngs=rngs),
                                  "audio": Frames(3, 5, rngs)}, "concat", num_outputs=1,
                                 fusion_dim=6, rngs=rngs)
    data = {**make_data(), "label": make_data()["label"].astype(np.float32)}
    with pytest.raises(TypeError, match="strategy: PMR needs a classification task"):
        fit(regressor, Regression(), data, workdir=tmp_path / "b", batch_size=BATCH,
            strategy=PMR(alpha=1.0))
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "ab")
