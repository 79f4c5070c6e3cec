"""lepton_mm.balance: OGM-GE's scores and coefficients, Gradient Blending's weights and
MMPareto's combination against hand-computed values, the gradient modulations (OGM-GE,
MMPareto, MSLR), the blended loss's gradient, and fit(strategy=...)."""

import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_training_loop import BATCH, make_data, make_model, params_of

from lepton_mm import balance
from lepton_mm.balance import (
    FUSED,
    MSLR,
    OGMGE,
    GradientBlending,
    MMPareto,
    gradient_blending_weights,
    head_losses,
    label_scores,
    ogm_ge_coefficients,
    pareto_combine,
    unimodal_losses,
)
from lepton_mm.data import ArrayDataset
from lepton_mm.models import Classification
from lepton_mm.robustness import mark_absent
from lepton_mm.training import (
    CheckpointMismatchError,
    OptimizerConfig,
    evaluate,
    fit,
    make_optimizer,
    read_log,
)


def test_docstring_examples_run():
    results = doctest.testmod(balance, optionflags=doctest.ELLIPSIS, verbose=False)
    assert results.attempted > 0 and results.failed == 0


def test_coefficients_match_the_papers_equations_by_hand():
    scores = {"a": np.array([0.9, 0.6, 0.2, 0.99]), "v": np.array([0.3, 0.2, 0.1, 0.0])}
    valid = np.array([True, True, True, False])  # the last row is padding
    k, rho = ogm_ge_coefficients(scores, alpha=0.3, valid=valid)
    rho_a = (0.9 + 0.6 + 0.2) / (0.3 + 0.2 + 0.1)  # Eq. 9 over valid rows
    assert float(rho["a"]) == pytest.approx(rho_a, rel=1e-6)
    assert float(rho["v"]) == pytest.approx(1 / rho_a, rel=1e-6)
    assert float(k["a"]) == pytest.approx(1 - math.tanh(0.3 * rho_a), rel=1e-6)  # Eq. 10
    assert float(k["v"]) == 1.0  # not dominant: unchanged
    # Three modalities: the denominator is the mean of the others' sums.
    k3, rho3 = ogm_ge_coefficients({"a": np.array([0.8]), "b": np.array([0.4]),
                                    "c": np.array([0.2])}, alpha=1.0)
    assert float(rho3["a"]) == pytest.approx(0.8 / 0.3, rel=1e-6)
    assert float(k3["a"]) == pytest.approx(1 - math.tanh(0.8 / 0.3), abs=1e-7)  # float32
    assert float(rho3["b"]) == pytest.approx(0.4 / 0.5, rel=1e-6)
    assert float(k3["b"]) == float(k3["c"]) == 1.0
    with pytest.raises(ValueError, match="alpha: expected a finite number > 0"):
        ogm_ge_coefficients(scores, alpha=0.0)
    with pytest.raises(ValueError, match="scores: expected two or more"):
        ogm_ge_coefficients({"a": scores["a"]}, alpha=1.0)


def _batch(n=BATCH):
    return next(iter(ArrayDataset(make_data()).batches(n, seed=0, epoch=0)))


def test_label_scores_are_the_unimodal_models_confidence_in_the_label():
    model, batch = make_model(0), _batch()
    model.eval()
    scores = label_scores(model, batch, ["audio", "image"])
    n = len(batch["label"])
    for u, other in (("audio", "image"), ("image", "audio")):
        own = batch["present"].get(u, np.ones(n, bool))
        alone = {**batch, "present": {u: np.asarray(own), other: np.zeros(n, bool)}}
        probs = jax.nn.softmax(model(alone), axis=-1)
        expected = np.where(own, np.asarray(probs)[np.arange(n), batch["label"]], 0.0)
        np.testing.assert_allclose(scores[u], expected, rtol=1e-6, atol=1e-7)
    assert not batch["present"]["audio"].all()  # some rows lack audio: they score 0
    assert np.all(np.asarray(scores["audio"])[~batch["present"]["audio"]] == 0)


def _grads(model):
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    return jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)


def test_modulation_scales_only_the_dominant_encoder_and_adds_matched_noise():
    model, batch = make_model(0), _batch()
    grads = _grads(model)
    key = jax.random.key(3)
    plain = OGMGE(alpha=0.5, noise=False)
    out, metrics = plain.modulate(model, batch, grads, key, jnp.int32(0))
    k = {u: float(metrics[f"ogm/coeff_{u}"]) for u in ("audio", "image")}
    rho = {u: float(metrics[f"ogm/ratio_{u}"]) for u in ("audio", "image")}
    assert rho["audio"] == pytest.approx(1 / rho["image"], rel=1e-5)
    dominant = max(rho, key=rho.get)
    assert k[dominant] == pytest.approx(1 - math.tanh(0.5 * rho[dominant]), rel=1e-5)
    assert k[min(rho, key=rho.get)] == 1.0
    for (path, g), (_, g0) in zip(jax.tree_util.tree_flatten_with_path(out)[0],
                                  jax.tree_util.tree_flatten_with_path(grads)[0], strict=True):
        names = [p.key for p in path]
        factor = k[names[1]] if names[0] == "encoders" else 1.0  # fusion, head: untouched
        np.testing.assert_allclose(g, factor * np.asarray(g0), rtol=1e-6)
    # Outside [start_step, end_step): the gradient passes unchanged.
    late = OGMGE(alpha=0.5, noise=False, end_step=10)
    same, m = late.modulate(model, batch, grads, key, jnp.int32(10))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(same),
                                                    jax.tree.leaves(grads), strict=True))
    assert float(m[f"ogm/coeff_{dominant}"]) == 1.0
    # GE: noise with the gradient array's std, the same for the same key.
    varied = jax.tree.map(lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape),
                          nnx.as_pure(nnx.state(model, nnx.Param)))
    # (each call on a copy: in train mode the model's dropout stream advances per call)
    noisy, _ = OGMGE(alpha=0.5).modulate(nnx.clone(model), batch, varied, key, jnp.int32(0))
    again, _ = OGMGE(alpha=0.5).modulate(nnx.clone(model), batch, varied, key, jnp.int32(0))
    scaled, _ = plain.modulate(nnx.clone(model), batch, varied, key, jnp.int32(0))
    for a, b in zip(jax.tree.leaves(noisy), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    kernel = [(p, a, c, g) for (p, a), c, g in zip(
        jax.tree_util.tree_flatten_with_path(noisy)[0], jax.tree.leaves(scaled),
        jax.tree.leaves(varied), strict=True) if p[0].key == "encoders" and a.size >= 30]
    assert kernel
    for _, a, c, g in kernel:
        noise = np.asarray(a) - np.asarray(c)
        assert noise.std() == pytest.approx(float(np.std(g)), rel=0.4)


def _fit(workdir, strategy, epochs=2):
    model = make_model(0)
    result = fit(model, Classification(3), make_data(), workdir=workdir, epochs=epochs,
                 batch_size=BATCH, optimizer=OptimizerConfig(learning_rate=0.02), seed=0,
                 strategy=strategy)
    return model, result


def test_fit_with_ogm_ge_logs_the_modulation_and_resumes_only_as_itself(tmp_path):
    strategy = OGMGE(alpha=0.5)
    _fit(tmp_path / "ogm", strategy)
    steps = [r for r in read_log(tmp_path / "ogm" / "log.jsonl") if r["kind"] == "step"]
    assert steps and all({"ogm/ratio_audio", "ogm/ratio_image", "ogm/coeff_audio",
                          "ogm/coeff_image"} <= set(r) for r in steps)
    assert all(0 < r["ogm/coeff_audio"] <= 1 and 0 < r["ogm/coeff_image"] <= 1
               for r in steps)
    assert any(min(r["ogm/coeff_audio"], r["ogm/coeff_image"]) < 1 for r in steps)
    with pytest.raises(CheckpointMismatchError, match="strategy"):
        _fit(tmp_path / "ogm", OGMGE(alpha=0.25), epochs=3)
    _, resumed = _fit(tmp_path / "ogm", OGMGE(alpha=0.5), epochs=3)
    assert resumed.resumed_from is not None


@pytest.mark.parametrize("make, error, match", [
    (lambda: OGMGE(alpha=-1.0), ValueError, r"alpha: expected a finite number > 0"),
    (lambda: OGMGE(alpha=1.0, modalities=("audio",)), ValueError, r"modalities: .*two"),
    (lambda: OGMGE(alpha=1.0, modalities="audio"), TypeError, r"modalities: expected a tuple"),
    (lambda: OGMGE(alpha=1.0, start_step=5, end_step=5), ValueError, r"end_step: "),
    (lambda: OGMGE(alpha=1.0, start_step=-1), ValueError, r"start_step: "),
])
def test_bad_settings(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_strategies_fail_before_training(tmp_path):
    with pytest.raises(TypeError, match="strategy: expected an object with a modulate.* or a "
                                        "loss"):
        _fit(tmp_path / "a", "ogm")
    with pytest.raises(ValueError, match=r"strategy: OGMGE modalities: unknown modality 'text'"):
        _fit(tmp_path / "b", OGMGE(alpha=1.0, modalities=("audio", "text")))
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "ab")


# ---- Gradient Blending ---------------------------------------------------------------


def test_blending_weights_match_proposition_1_by_hand():
    before = {FUSED: (0.9, 1.00), "audio": (1.0, 1.05), "image": (0.7, 0.90)}
    after = {FUSED: (0.5, 0.80), "audio": (0.9, 1.00), "image": (0.3, 0.95)}
    w = gradient_blending_weights(before, after)
    # dG = L^V_n - L^V_n+dn; dO = (L^V - L^T)_n+dn - (L^V - L^T)_n; w = (dG/dO^2) / Z
    g_f, o_f = 1.00 - 0.80, (0.80 - 0.5) - (1.00 - 0.9)
    g_a, o_a = 1.05 - 1.00, (1.00 - 0.9) - (1.05 - 1.0)
    r_f, r_a = g_f / o_f**2, g_a / o_a**2  # image: validation loss rose -> weight 0
    z = (r_f + r_a) / 2
    assert w == pytest.approx({FUSED: r_f / z, "audio": r_a / z, "image": 0.0}, rel=1e-12)
    assert sum(w.values()) == pytest.approx(2.0)  # the paper's Z
    with pytest.raises(ValueError, match="no head's validation loss fell"):
        gradient_blending_weights({"a": (1.0, 1.0)}, {"a": (0.5, 1.2)})
    with pytest.raises(ValueError, match="the same heads"):
        gradient_blending_weights({"a": (1.0, 1.0)}, {"b": (0.5, 0.9)})
    with pytest.raises(ValueError, match=r"after\['a'\]: expected finite"):
        gradient_blending_weights({"a": (1.0, 1.0)}, {"a": (0.5, float("nan"))})
    with pytest.raises(ValueError, match=r"before\['a'\]: expected \(train_loss"):
        gradient_blending_weights({"a": 1.0}, {"a": (0.5, 0.9)})


def test_unimodal_losses_are_the_task_loss_with_one_modality_present():
    model, batch = make_model(0), _batch()
    model.eval()
    task = Classification(3)
    losses = unimodal_losses(model, task, batch, ["audio", "image"])
    n = len(batch["label"])
    own = batch["present"]["audio"]
    alone = {**batch, "present": {"audio": own, "image": np.zeros(n, bool)}}
    logp = np.asarray(jax.nn.log_softmax(model(alone), axis=-1))[np.arange(n), batch["label"]]
    assert float(losses["audio"]) == pytest.approx(-logp[own].mean(), rel=1e-5)
    alone = {**batch, "present": {"audio": np.zeros(n, bool), "image": np.ones(n, bool)}}
    logp = np.asarray(jax.nn.log_softmax(model(alone), axis=-1))[np.arange(n), batch["label"]]
    assert float(losses["image"]) == pytest.approx(-logp.mean(), rel=1e-5)
    # head_losses: the same, through evaluate, over a whole dataset
    data = make_data(12, seed=1)
    heads = head_losses(model, task, data, batch_size=5)
    assert heads[FUSED] == pytest.approx(evaluate(model, task, data)["loss"], rel=1e-6)
    assert heads["audio"] == pytest.approx(
        evaluate(model, task, mark_absent(data, "image"))["loss"], rel=1e-6)
    assert heads["image"] != pytest.approx(heads["audio"])


def test_blended_gradient_is_the_weighted_sum_of_the_heads_gradients():
    model, batch = make_model(0), _batch()
    model.eval()  # no dropout: every pass is the same function
    task = Classification(3)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    weights = {FUSED: 1.0, "audio": 0.5, "image": 2.0}
    blend = GradientBlending(weights)

    def head(name):
        def f(p):
            m = nnx.merge(graphdef, p, rest)
            if name == FUSED:
                return task.loss(m(batch), batch, batch["valid"])
            return unimodal_losses(m, task, batch, [name])[name]
        return f

    def objective(p):
        m = nnx.merge(graphdef, p, rest)
        outputs = m(batch)
        value, metrics = blend.loss(m, task, batch, outputs,
                                    task.loss(outputs, batch, batch["valid"]),
                                    jax.random.key(0), jnp.int32(0))
        return value, metrics

    batch = {**batch, "valid": np.ones(len(batch["label"]), bool)}
    (value, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
    expected = sum(w * float(head(k)(params)) for k, w in weights.items())
    assert float(value) == pytest.approx(expected, rel=1e-5)
    assert set(metrics) == {"gblend/loss_fused", "gblend/loss_audio", "gblend/loss_image"}
    parts = {k: jax.grad(head(k))(params) for k in weights}
    summed = jax.tree.map(lambda *g: sum(w * x for w, x in zip(weights.values(), g, strict=True)),
                          *parts.values())
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(summed), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fit_with_gradient_blending_logs_the_heads_and_leaves_batch_stats_alone(tmp_path):
    stats = lambda m: [np.asarray(x) for x in jax.tree.leaves(
        nnx.as_pure(nnx.state(m, nnx.BatchStat)))]
    plain_model, _ = _fit(tmp_path / "plain", None, epochs=1)
    # A negligible weight on the audio head: the same updates as plain training up to
    # float error, and the extra audio-only passes must not move the batch statistics.
    tiny_model, _ = _fit(tmp_path / "tiny", GradientBlending({FUSED: 1.0, "audio": 1e-9}),
                            epochs=1)
    assert stats(plain_model)
    for a, b in zip(stats(tiny_model), stats(plain_model), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    steps = [r for r in read_log(tmp_path / "tiny" / "log.jsonl") if r["kind"] == "step"]
    assert steps and all({"gblend/loss_fused", "gblend/loss_audio"} <= set(r) for r in steps)
    # the logged loss is the task's loss on the fused outputs, not the objective
    assert all(r["loss"] == pytest.approx(r["gblend/loss_fused"], rel=1e-6) for r in steps)

    blended_model, _ = _fit(tmp_path / "blend", GradientBlending({FUSED: 1.0, "audio": 1.0}),
                            epochs=1)
    moved = [not np.allclose(a, b, rtol=1e-3) for a, b in zip(
        params_of(blended_model), params_of(plain_model), strict=True)]
    assert any(moved)
    with pytest.raises(CheckpointMismatchError, match="strategy"):
        _fit(tmp_path / "blend", GradientBlending({FUSED: 1.0, "audio": 0.5}), epochs=2)


@pytest.mark.parametrize("weights, error, match", [
    ({FUSED: -1.0}, ValueError, r"weights\['fused'\]: expected a finite number >= 0"),
    ({FUSED: 0.0, "audio": 0.0}, ValueError, r"weights: expected at least one weight > 0"),
    ({}, ValueError, r"weights: expected \{head: weight\} with at least one head"),
    ("fused", TypeError, r"weights: expected \{head: weight\}"),
    ([(FUSED, 1.0), (FUSED, 2.0)], ValueError, r"weights: expected each head once"),
    ({FUSED: True}, ValueError, r"weights\['fused'\]: expected a finite number"),
])
def test_bad_blending_weights(weights, error, match):
    with pytest.raises(error, match=match):
        GradientBlending(weights)


def test_blending_an_unknown_head_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"strategy: GradientBlending heads: unknown "
                                         r"modality 'text'\. Known: \['audio', 'fused'"):
        _fit(tmp_path / "t", GradientBlending({FUSED: 1.0, "text": 1.0}))
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").iterdir())


# ---- MMPareto ------------------------------------------------------------------------


def test_pareto_combine_matches_the_min_norm_solution_by_hand():
    # Conflict: <g_m, g_u> = -1, ||g_m||^2 = 5, ||g_u||^2 = 2.
    g_m, g_u = np.array([2.0, 1.0], np.float32), np.array([-1.0, 1.0], np.float32)
    direction, alpha, cos = jax.jit(pareto_combine)(g_m, g_u)
    # alpha* = <g_u - g_m, g_u> / ||g_m - g_u||^2 = (2 + 1) / (5 + 2 + 2) = 1/3
    assert float(alpha) == pytest.approx(1 / 3, rel=1e-6)
    assert float(cos) == pytest.approx(-1 / math.sqrt(10), rel=1e-6)
    h = g_m / 3 + 2 * g_u / 3  # = (0, 1): the min-norm point of the segment
    np.testing.assert_allclose(h, [0.0, 1.0], atol=1e-7)
    np.testing.assert_allclose(direction, [0.0, math.sqrt(5)], rtol=1e-6, atol=1e-6)
    # No conflict: weights 1/2 each, rescaled to ||g_m + g_u||: the sum itself.
    direction, alpha, cos = pareto_combine(np.array([2.0, 1.0]), np.array([1.0, -1.0]))
    assert float(alpha) == 0.5 and float(cos) == pytest.approx(1 / math.sqrt(10), rel=1e-6)
    np.testing.assert_allclose(direction, [3.0, 0.0], rtol=1e-6, atol=1e-7)
    # Degenerate cases: a zero unimodal gradient leaves g_m; opposite ones give 0.
    direction, alpha, cos = pareto_combine(np.array([1.0, 2.0]), np.zeros(2))
    assert float(cos) == 0.0 and float(alpha) == 0.5
    np.testing.assert_allclose(direction, [1.0, 2.0], rtol=1e-6)
    direction, _, cos = pareto_combine(np.array([1.0, 2.0]), np.array([-2.0, -4.0]))
    assert float(cos) == pytest.approx(-1.0)
    np.testing.assert_allclose(direction, [0.0, 0.0], atol=1e-6)


def test_pareto_combine_descends_both_losses_with_the_sums_norm():
    rng = np.random.default_rng(0)
    conflicts = 0
    for _ in range(200):
        dim = int(rng.integers(2, 20))
        g_m = rng.normal(size=dim).astype(np.float32)
        g_u = (rng.normal(size=dim) * rng.uniform(0.1, 5)).astype(np.float32)
        direction, alpha, cos = pareto_combine(g_m, g_u)
        d = np.asarray(direction, np.float64)
        scale = float(np.linalg.norm(g_m) * np.linalg.norm(g_u)) + 1e-12
        assert d @ g_m >= -1e-5 * scale and d @ g_u >= -1e-5 * scale  # the Pareto property
        assert np.linalg.norm(d) == pytest.approx(np.linalg.norm(g_m + g_u), rel=1e-5)
        assert float(cos) == pytest.approx(g_m @ g_u / scale, abs=1e-5)
        if cos < 0:
            conflicts += 1
            assert 0 < float(alpha) < 1
            assert d @ g_m == pytest.approx(d @ g_u, rel=1e-3, abs=1e-5 * scale)
        else:
            np.testing.assert_allclose(d, g_m + g_u, rtol=1e-5, atol=1e-6)
    assert 20 < conflicts < 180
    # A pytree is one vector: the same as its leaves concatenated.
    g_m = {"a": rng.normal(size=(2, 3)).astype(np.float32), "b": np.float32([1.0, -2.0])}
    g_u = {"a": -g_m["a"] + 0.3, "b": np.float32([0.5, 1.0])}
    tree, alpha, cos = pareto_combine(g_m, g_u)
    flat = lambda t: np.concatenate([np.ravel(t["a"]), np.ravel(t["b"])])
    vector, alpha_v, cos_v = pareto_combine(flat(g_m), flat(g_u))
    np.testing.assert_allclose(flat(tree), vector, rtol=1e-6)
    assert float(alpha) == pytest.approx(float(alpha_v)) and float(cos) == pytest.approx(
        float(cos_v))
    assert tree["a"].shape == (2, 3) and tree["a"].dtype == np.float32
    with pytest.raises(ValueError, match="g_u: expected the structure of g_m"):
        pareto_combine(g_m, {"a": g_u["a"]})
    with pytest.raises(ValueError, match=r"g_u: leaf 0 has shape \(3,\)"):
        pareto_combine(np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="g_m: expected at least one array"):
        pareto_combine({}, {})


def _flat_items(tree):
    return [("/".join(str(p.key) for p in path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_mmpareto_combines_each_encoders_gradients_and_leaves_fusion_and_head():
    model, batch = make_model(0), _batch()
    model.eval()  # no dropout: the hand-computed gradients are the same function
    batch = {**batch, "valid": np.ones(len(batch["label"]), bool)}
    task = Classification(3)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.as_pure(params)
    g_m = jax.grad(lambda p: task.loss(nnx.merge(graphdef, p, rest)(batch), batch,
                                       batch["valid"]))(params)
    out, metrics = MMPareto(task).modulate(model, batch, g_m, jax.random.key(0),
                                           jnp.int32(0))
    assert set(metrics) == {f"mmpareto/{k}_{u}" for k in ("cos", "alpha", "loss")
                            for u in ("audio", "image")}
    assert all(v.shape == () and v.dtype == jnp.float32 for v in metrics.values())
    got, before = dict(_flat_items(out)), dict(_flat_items(g_m))
    for name, g in before.items():
        if not name.startswith("encoders/"):
            np.testing.assert_array_equal(got[name], g)  # fusion, head: g_m only
    for u in ("audio", "image"):
        g_u = jax.grad(lambda p, u=u: unimodal_losses(nnx.merge(graphdef, p, rest), task,
                                                      batch, [u])[u])(params)
        names = [n for n in before if n.startswith(f"encoders/{u}/")]
        vec_m = np.concatenate([np.ravel(before[n]) for n in names])
        vec_u = np.concatenate([np.ravel(dict(_flat_items(g_u))[n]) for n in names])
        expected, alpha, _ = pareto_combine(vec_m, vec_u)
        vec = np.concatenate([np.ravel(got[n]) for n in names])
        np.testing.assert_allclose(vec, expected, rtol=1e-4, atol=1e-6)
        assert not np.allclose(vec, vec_m)  # the unimodal loss did change the encoder
        assert float(metrics[f"mmpareto/cos_{u}"]) == pytest.approx(
            vec_m @ vec_u / np.linalg.norm(vec_m) / np.linalg.norm(vec_u), abs=1e-5)
        assert float(metrics[f"mmpareto/alpha_{u}"]) == pytest.approx(float(alpha),
                                                                     abs=1e-5)
        assert np.linalg.norm(vec) == pytest.approx(np.linalg.norm(vec_m + vec_u),
                                                    rel=1e-4)
    # gamma scales the combined encoder gradients; unlisted encoders keep g_m.
    scaled, m = MMPareto(task, modalities=("audio",), gamma=2.0).modulate(
        model, batch, g_m, jax.random.key(0), jnp.int32(0))
    assert set(m) == {"mmpareto/cos_audio", "mmpareto/alpha_audio", "mmpareto/loss_audio"}
    for name, g in _flat_items(scaled):
        if name.startswith("encoders/audio/"):
            np.testing.assert_allclose(g, 2 * got[name], rtol=1e-5, atol=1e-7)
        else:
            np.testing.assert_array_equal(g, before[name])


def test_fit_with_mmpareto_logs_the_combination_each_step(tmp_path):
    strategy = MMPareto(Classification(3))
    assert strategy == MMPareto(Classification(3)) and hash(strategy) == hash(
        MMPareto(Classification(3)))
    assert repr(strategy) == ("MMPareto(task=Classification(num_classes=3, "
                              "label_smoothing=0.0), modalities=None, gamma=1.0)")
    _fit(tmp_path / "mmp", strategy, epochs=1)
    steps = [r for r in read_log(tmp_path / "mmp" / "log.jsonl") if r["kind"] == "step"]
    assert steps and all({"mmpareto/cos_audio", "mmpareto/cos_image", "mmpareto/alpha_audio",
                          "mmpareto/alpha_image"} <= set(r) for r in steps)
    for r in steps:
        for u in ("audio", "image"):
            assert -1 - 1e-5 <= r[f"mmpareto/cos_{u}"] <= 1 + 1e-5
            assert 0 <= r[f"mmpareto/alpha_{u}"] <= 1
            assert (r[f"mmpareto/alpha_{u}"] == 0.5) == (r[f"mmpareto/cos_{u}"] >= 0)
    assert all(math.isfinite(r["loss"]) for r in steps)


class _UnhashableTask:
    __hash__ = None

    def loss(self, outputs, batch, valid):
        return 0.0


@pytest.mark.parametrize("make, error, match", [
    (lambda: MMPareto("ce"), TypeError, r"task: expected a task with a loss"),
    (lambda: MMPareto(_UnhashableTask()), TypeError, r"task: expected a hashable task"),
    (lambda: MMPareto(Classification(3), modalities="audio"), TypeError,
     r"modalities: expected a tuple"),
    (lambda: MMPareto(Classification(3), modalities=()), ValueError,
     r"modalities: expected one or more distinct"),
    (lambda: MMPareto(Classification(3), modalities=("audio", "audio")), ValueError,
     r"modalities: expected one or more distinct"),
    (lambda: MMPareto(Classification(3), gamma=0.0), ValueError,
     r"gamma: expected a finite number > 0"),
    (lambda: MMPareto(Classification(3), gamma=float("nan")), ValueError,
     r"gamma: expected a finite number > 0"),
])
def test_bad_mmpareto_settings(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_mmpareto_strategies_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"strategy: MMPareto modalities: unknown modality "
                                         r"'text'\. Known: \['audio', 'image'\]\.$"):
        _fit(tmp_path / "t", MMPareto(Classification(3), modalities=("audio", "text")))
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").iterdir())
    with pytest.raises(TypeError, match="strategy: MMPareto needs a model with an `encoders`"):
        MMPareto(Classification(3)).check(object())


# ---- MSLR ----------------------------------------------------------------------------


def test_mslr_scales_each_encoders_gradient_exactly_and_nothing_else():
    model, batch = make_model(0), _batch()
    grads = jax.tree.map(lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape) / 3,
                         nnx.as_pure(nnx.state(model, nnx.Param)))
    strategy = MSLR({"image": 0.3, "audio": 2.5})
    assert strategy.scales == (("audio", 2.5), ("image", 0.3))
    assert strategy == MSLR([("image", 0.3), ("audio", 2.5)])
    assert hash(strategy) == hash(MSLR({"audio": 2.5, "image": 0.3}))
    assert repr(strategy) == "MSLR(scales=(('audio', 2.5), ('image', 0.3)))"
    out, metrics = jax.jit(strategy.modulate)(model, batch, grads, jax.random.key(0),
                                              jnp.int32(0))
    assert metrics == {}
    factors = {"audio": np.float32(2.5), "image": np.float32(0.3)}
    for (name, g), (_, g0) in zip(_flat_items(out), _flat_items(grads), strict=True):
        parts = name.split("/")
        if parts[0] == "encoders":
            np.testing.assert_array_equal(g, factors[parts[1]] * np.asarray(g0))
        else:
            np.testing.assert_array_equal(g, g0)
    only, _ = MSLR({"audio": 2.0}).modulate(model, batch, grads, None, None)
    for (name, g), (_, g0) in zip(_flat_items(only), _flat_items(grads), strict=True):
        expected = 2 * np.asarray(g0) if name.startswith("encoders/audio/") else g0
        np.testing.assert_array_equal(g, expected)


def test_mslr_is_a_learning_rate_under_sgd_but_not_under_adam():
    model, batch = make_model(0), _batch()
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    strategy = MSLR({"audio": 4.0, "image": 0.25})
    scaled, _ = strategy.modulate(model, batch, grads, None, None)

    def first_update(config, g):
        tx = make_optimizer(config)
        state = tx.init(params)
        for _ in range(2):  # two steps: momentum carries the factor too
            updates, state = tx.update(g, state, params)
        return updates

    sgd = OptimizerConfig(name="sgd", learning_rate=0.1, momentum=0.9)
    by_lr = first_update(OptimizerConfig(name="sgd", learning_rate=0.1, momentum=0.9,
                                         lr_multipliers=strategy.lr_multipliers()), grads)
    for a, b in zip(jax.tree.leaves(first_update(sgd, scaled)), jax.tree.leaves(by_lr),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    adam = OptimizerConfig(name="adam", learning_rate=0.1)
    for a, b in zip(jax.tree.leaves(first_update(adam, scaled)),
                    jax.tree.leaves(first_update(adam, grads)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # the factor cancels


@pytest.mark.parametrize("scales, error, match", [
    ({"audio": 0.0}, ValueError, r"scales\['audio'\]: expected a finite number > 0"),
    ({"audio": -1.0}, ValueError, r"scales\['audio'\]: expected a finite number > 0"),
    ({"audio": float("nan")}, ValueError, r"scales\['audio'\]: expected a finite number"),
    ({"audio": float("inf")}, ValueError, r"scales\['audio'\]: expected a finite number"),
    ({"audio": True}, ValueError, r"scales\['audio'\]: expected a finite number"),
    ({}, ValueError, r"scales: expected \{modality: factor\} with at least one"),
    ("audio", TypeError, r"scales: expected \{modality: factor\}"),
    ({1: 2.0}, TypeError, r"scales: expected modality names"),
    ([("audio", 1.0), ("audio", 2.0)], ValueError, r"scales: expected each modality once"),
])
def test_bad_mslr_scales(scales, error, match):
    with pytest.raises(error, match=match):
        MSLR(scales)


def test_mslr_of_an_unknown_modality_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"strategy: MSLR scales: unknown modality 'text'"):
        _fit(tmp_path / "t", MSLR({"audio": 2.0, "text": 0.5}))
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").iterdir())
    with pytest.raises(TypeError, match="strategy: MSLR needs a model with an `encoders`"):
        MSLR({"audio": 2.0}).check(object())


def test_a_strategy_with_another_task_than_fit_fails_before_training(tmp_path):
    from lepton_mm.balance import MMPareto

    with pytest.raises(ValueError, match=r"strategy: its task Classification\(num_classes=4"):
        _fit(tmp_path / "t", MMPareto(Classification(4)))
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").iterdir())


class _Fixed(nnx.Module):
    """An encoder whose pooled output is its input: ``x [batch, dim]`` as one token."""

    def __call__(self, x):
        from lepton_mm.types import EncoderOutput

        return EncoderOutput(tokens=x[:, None], mask=jnp.ones((x.shape[0], 1), bool),
                             pooled=x)


class _Probed(nnx.Module):
    def __init__(self):
        self.encoders = nnx.Dict({"a": _Fixed(), "b": _Fixed()})


def _probe_data(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int32)
    return {"a": (np.eye(3)[y] * 3 + 0.1 * rng.normal(size=(n, 3))).astype(np.float32),
            "b": rng.normal(size=(n, 4)).astype(np.float32), "label": y}


def test_linear_probe_finds_the_informative_encoder_and_not_the_noise():
    train, test = _probe_data(300, 0), _probe_data(600, 1)
    a = balance.linear_probe(_Probed(), train, test, modality="a", num_classes=3,
                             batch_size=128)
    b = balance.linear_probe(_Probed(), train, test, modality="b", num_classes=3,
                             batch_size=128)
    assert a == {"train_accuracy": 1.0, "test_accuracy": 1.0, "dim": 3, "num_train": 300,
                 "num_test": 600}
    assert b["dim"] == 4 and b["test_accuracy"] < 0.45  # chance is 1/3
    # Deterministic: the same call gives the same numbers.
    assert balance.linear_probe(_Probed(), train, test, modality="b", num_classes=3,
                                batch_size=128) == b


def test_linear_probe_skips_absent_rows_and_leaves_the_model_alone():
    train, test = make_data(), make_data(12, seed=1)
    model = make_model(0)
    model.train()
    before = params_of(model)
    out = balance.linear_probe(model, train, test, modality="audio", num_classes=3,
                               batch_size=5)  # padded last batches, tuple inputs
    assert out["num_train"] == int(train["present"]["audio"].sum()) < len(train["label"])
    assert out["num_test"] == int(test["present"]["audio"].sum())
    assert out["dim"] == model.encoders["audio"].dim
    assert 0.0 <= out["test_accuracy"] <= 1.0 and 0.0 <= out["train_accuracy"] <= 1.0
    image = balance.linear_probe(model, train, test, modality="image", num_classes=3)
    assert image["num_train"] == len(train["label"]) and image["dim"] == 6
    after = params_of(model)
    assert all(np.array_equal(x, y) for x, y in zip(before, after, strict=True))
    assert model.encoders["image"].dropout.deterministic is False  # still in train mode
    # Padding rows of a batch dict (valid False) are left out too.
    valid = np.arange(len(train["label"])) < 12
    padded = balance.linear_probe(model, {**train, "valid": valid}, test, modality="image",
                                  num_classes=3)
    assert padded["num_train"] == 12
    with pytest.raises(ValueError, match="'video'"):
        balance.linear_probe(model, train, test, modality="video", num_classes=3)
