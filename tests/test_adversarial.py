"""lepton_mm.adversarial: FGSM and PGD on a batch's continuous inputs, robust accuracy."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_robustness import _bimodal_model  # image + audio (batch norm), concat + dropout

from lepton_mm import adversarial
from lepton_mm.adversarial import fgsm, model_loss, pgd, robust_accuracy


def _batch(n=6, seed=0):
    """Images in [0, 1] (some exactly on the bounds), padded log-mel frames, labels."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(size=(n, 6, 6, 1)).astype(np.float32)
    image[0, 0, 0, 0], image[0, 0, 1, 0] = 0.0, 1.0
    lengths = rng.integers(3, 10, (n, 1))  # every example has padded frames
    return {"image": image,
            "audio": (rng.normal(size=(n, 10, 8)).astype(np.float32),
                      np.arange(10)[None, :] < lengths),
            "label": rng.integers(0, 3, n).astype(np.int32)}


@pytest.fixture(scope="module")
def model():
    return _bimodal_model()


def _delta_norms(adv, clean, norm):
    """Per-example norm of ``adv - clean`` (float64), ``[batch]``."""
    d = (np.asarray(adv, np.float64) - np.asarray(clean, np.float64)).reshape(len(clean), -1)
    return np.abs(d).max(1) if norm == "linf" else np.sqrt((d ** 2).sum(1))


def _bits(x):
    return np.asarray(x).view(np.uint32)


def test_docstring_examples_run():
    results = doctest.testmod(adversarial, optionflags=doctest.ELLIPSIS, verbose=False)
    assert results.attempted > 0 and results.failed == 0


# ------------------------------------------------------------------------- FGSM


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_on_a_linear_loss_is_the_hand_computed_step(norm):
    """loss = <w_image, image> + <w_audio, log_mel>: the gradient is w everywhere, so
    FGSM is x + eps * sign(w) (L∞) or x + eps * w / ||w|| over the perturbable values
    (L2), and nothing where a frame is padded or the modality absent."""
    rng = np.random.default_rng(1)
    batch = _batch(4)
    batch["present"] = {"image": np.array([True, False, True, True])}
    w_image = rng.normal(size=(1, 6, 6, 1)).astype(np.float32)
    w_image[0, 2, :, 0] = 0.0  # zero gradient: no change there under L∞
    w_audio = rng.normal(size=(1, 10, 8)).astype(np.float32)

    def loss(b):
        return jnp.sum(b["image"] * w_image) + jnp.sum(b["audio"][0] * w_audio)

    eps = 0.1
    out = fgsm(loss, batch, eps=eps, norm=norm)

    image, (log_mel, mask) = batch["image"], batch["audio"]
    allow_image = np.broadcast_to(batch["present"]["image"][:, None, None, None],
                                  image.shape)
    allow_audio = np.broadcast_to(mask[:, :, None], log_mel.shape)
    for x, w, allow, got in [(image, w_image, allow_image, out["image"]),
                             (log_mel, w_audio, allow_audio, out["audio"][0])]:
        g = np.where(allow, np.broadcast_to(w, x.shape), 0.0)
        if norm == "linf":
            step = np.sign(g)
        else:
            n = np.sqrt((g.reshape(len(g), -1) ** 2).sum(1))
            step = g / np.where(n > 0, n, 1).reshape((-1,) + (1,) * (g.ndim - 1))
        expected = (x + eps * step).astype(np.float32)
        # L∞ adds ±eps exactly; L2 rounds the direction in float32 (a few ulp).
        np.testing.assert_allclose(np.asarray(got), expected, rtol=0,
                                   atol=1e-7 if norm == "linf" else 1e-6)
        np.testing.assert_array_equal(_bits(got)[~allow], _bits(x)[~allow])
    assert out["audio"][1] is mask and out["label"] is batch["label"]


def test_fgsm_on_a_model_uses_its_cross_entropy_in_eval_mode(model):
    """fgsm(model, ...) is x + eps * sign(grad of the eval-mode mean cross-entropy),
    with the gradient taken here through the model itself, not through functional."""
    from flax import nnx

    batch = _batch()
    reference = nnx.clone(model)
    reference.eval()

    @nnx.jit
    def loss(reference, image):
        logits = reference({**batch, "image": image})
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    g = np.asarray(nnx.grad(loss, argnums=1)(reference, jnp.asarray(batch["image"])))
    assert np.count_nonzero(g) > g.size // 2
    out = fgsm(model, batch, eps=0.05, modalities="image")
    np.testing.assert_allclose(np.asarray(out["image"]), batch["image"] + 0.05 * np.sign(g),
                               rtol=0, atol=1e-7)
    # The caller's model is still in train mode (dropout on).
    assert not any(m.deterministic for _, m in nnx.iter_modules(model)
                   if isinstance(m, nnx.Dropout))


# -------------------------------------------------------------------------- PGD


@pytest.mark.parametrize("norm, eps", [("linf", 0.2), ("l2", 0.8)])
def test_pgd_stays_in_the_ball_and_the_clip_range(model, norm, eps):
    batch = _batch()
    out = pgd(model, batch, eps=eps, steps=5, norm=norm, clip={"image": (0.0, 1.0)},
              key=jax.random.key(3))
    for adv, clean in [(out["image"], batch["image"]), (out["audio"][0], batch["audio"][0])]:
        norms = _delta_norms(adv, clean, norm)
        assert np.all(norms <= eps * (1 + 1e-5)), norms
        assert norms.max() >= 0.9 * eps  # the attack does use its budget
    image = np.asarray(out["image"])
    assert image.min() >= 0.0 and image.max() <= 1.0
    # The clip was active (the input has 2 values on the bounds), so the check above
    # could fail: many values end exactly on a bound.
    assert np.sum((image == 0.0) | (image == 1.0)) > 10


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_beats_fgsm_where_fgsm_overshoots(norm):
    """loss = -||x - 0.3||² is maximal inside the ball: FGSM jumps to its edge
    (overshooting, under L∞ even below the clean loss); PGD's small steps find it."""
    def loss(b):
        return -jnp.sum((b["x"] - 0.3) ** 2)

    batch = {"x": np.zeros((2, 4), np.float32)}
    clean = float(loss(batch))
    one = float(loss(fgsm(loss, batch, eps=1.0, norm=norm)))
    many = float(loss(pgd(loss, batch, eps=1.0, steps=40, step_size=0.05, norm=norm)))
    assert many >= clean and many > one
    assert many == pytest.approx(0.0, abs=0.05)


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.5)])
def test_pgd_raises_the_models_loss_at_least_as_much_as_fgsm(model, norm, eps):
    batch = _batch()
    loss = model_loss(model)
    clean = float(loss(batch))
    clip = {"image": (0.0, 1.0)}
    one = float(loss(fgsm(loss, batch, eps=eps, norm=norm, clip=clip)))
    many = float(loss(pgd(loss, batch, eps=eps, steps=10, norm=norm, clip=clip)))
    assert one > clean and many >= one


def test_eps_zero_returns_the_input_exactly(model):
    batch = _batch()
    batch["image"][1, 0, 0, 0] = -0.0  # a sign bit that x + 0.0 would lose
    batch["image"][2, 0, 0, 0] = 1.5  # outside the clip range: stays where it is
    for norm in ("linf", "l2"):
        for out in (fgsm(model, batch, eps=0.0, norm=norm, clip={"image": (0.0, 1.0)}),
                    pgd(model, batch, eps=0.0, steps=3, norm=norm, key=jax.random.key(0),
                        step_size=0.1, clip={"image": (0.0, 1.0)})):
            np.testing.assert_array_equal(_bits(out["image"]), _bits(batch["image"]))
            np.testing.assert_array_equal(_bits(out["audio"][0]), _bits(batch["audio"][0]))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_padding_absent_modalities_and_padding_rows_are_never_perturbed(model, norm):
    batch = _batch()
    batch["present"] = {"image": np.array([1, 0, 1, 1, 0, 1], bool),
                        "audio": np.array([1, 1, 0, 1, 1, 1], bool)}
    batch["valid"] = np.array([1, 1, 1, 1, 1, 0], bool)
    out = pgd(model, batch, eps=0.5, steps=3, norm=norm, key=jax.random.key(1),
              clip={"image": (0.0, 1.0)})
    log_mel, mask = batch["audio"]
    allow = {"image": np.broadcast_to((batch["present"]["image"] & batch["valid"])
                                      [:, None, None, None], batch["image"].shape),
             "audio": np.broadcast_to((mask & (batch["present"]["audio"]
                                               & batch["valid"])[:, None])[:, :, None],
                                      log_mel.shape)}
    for m, adv, clean in [("image", out["image"], batch["image"]),
                          ("audio", out["audio"][0], log_mel)]:
        same = _bits(adv) == _bits(clean)
        assert same[~allow[m]].all(), m  # bit-identical where not perturbable
        # The random start moved the rest (but for pixels held on a bound by the clip).
        assert np.mean(same[allow[m]]) < 0.05, m


def test_attacking_one_modality_leaves_the_other_untouched(model):
    batch = _batch()
    clip = {"image": (0.0, 1.0)}
    image_only = pgd(model, batch, eps=0.1, steps=2, modalities="image", clip=clip,
                     key=jax.random.key(0))
    assert image_only["audio"] is batch["audio"]
    assert not np.array_equal(image_only["image"], batch["image"])
    audio_only = pgd(model, batch, eps=0.1, steps=2, modalities=["audio"])
    assert audio_only["image"] is batch["image"]
    assert audio_only["audio"][1] is batch["audio"][1]  # the mask is the input's
    assert not np.array_equal(audio_only["audio"][0], batch["audio"][0])
    both = pgd(model, batch, eps=0.1, steps=2, clip=clip)
    assert not np.array_equal(both["image"], batch["image"])
    assert not np.array_equal(both["audio"][0], batch["audio"][0])


def test_per_modality_radii(model):
    batch = _batch()
    out = pgd(model, batch, eps={"image": 0.05, "audio": 0.5}, steps=3,
              clip={"image": (0.0, 1.0)})
    assert _delta_norms(out["image"], batch["image"], "linf").max() == pytest.approx(
        0.05, rel=1e-5)
    assert _delta_norms(out["audio"][0], batch["audio"][0], "linf").max() == pytest.approx(
        0.5, rel=1e-5)


def test_same_key_same_random_start(model):
    batch = _batch()
    kwargs = {"eps": 0.2, "steps": 1, "step_size": 1e-3, "clip": {"image": (0.0, 1.0)}}
    a = pgd(model, batch, key=jax.random.key(7), **kwargs)["image"]
    b = pgd(model, batch, key=jax.random.key(7), **kwargs)["image"]
    c = pgd(model, batch, key=jax.random.key(8), **kwargs)["image"]
    clean_start = pgd(model, batch, **kwargs)["image"]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        pgd(model, batch, key=jax.random.key(7), **kwargs)["audio"][0],
        pgd(model, batch, key=jax.random.key(7), **kwargs)["audio"][0])
    assert np.mean(np.asarray(a) != np.asarray(c)) > 0.9
    assert np.mean(np.asarray(a) != np.asarray(clean_start)) > 0.9


def test_random_starts_follow_the_modality_name_and_stay_in_the_ball():
    """A modality's start depends on its name, never on which others are attacked; a
    single step of zero-gradient ascent leaves the start itself, inside the ball."""
    batch = {"a": np.zeros((64, 5), np.float32), "b": np.zeros((64, 5), np.float32),
             "label": np.zeros(64, np.int32)}
    flat = lambda b: jnp.float32(0.0) * (b["a"].sum() + b["b"].sum())  # zero gradient
    kwargs = {"eps": 0.3, "steps": 1, "step_size": 1e-3, "key": jax.random.key(5)}
    both = pgd(flat, batch, **kwargs)
    only_b = pgd(flat, batch, modalities="b", **kwargs)
    np.testing.assert_array_equal(only_b["b"], both["b"])
    np.testing.assert_array_equal(only_b["a"], batch["a"])  # not attacked: untouched
    assert not np.array_equal(both["a"], both["b"])  # independent draws per modality
    start = np.asarray(both["a"])
    assert np.abs(start).max() <= 0.3 + 1e-6 and start.std() == pytest.approx(
        0.3 / np.sqrt(3), rel=0.15)  # uniform on [-eps, eps]


def test_a_malformed_frame_mask_is_an_error_not_a_perturbed_padding(model):
    batch = _batch(2)
    x, mask = batch["audio"]
    for bad, error, match in ((mask.astype(np.int32), TypeError, "expected bool"),
                              (mask[:, :5], ValueError, r"expected bool \[batch, time\]")):
        with pytest.raises(error, match=r"batch\['audio'\]\[1\]: .*" + match):
            fgsm(model, {**batch, "audio": (x, bad)}, eps=0.5, modalities="audio")


def test_pgd_under_jit_equals_eager_with_a_traced_radius(model):
    batch = _batch()
    loss = model_loss(model)
    kwargs = {"steps": 5, "norm": "l2", "key": jax.random.key(3), "clip": {"image": (0.0, 1.0)}}

    @jax.jit
    def attack(b, eps):
        return pgd(loss, b, eps=eps, **kwargs)

    jitted = attack(batch, jnp.float32(0.8))
    eager = pgd(loss, batch, eps=0.8, **kwargs)
    np.testing.assert_allclose(jitted["image"], eager["image"], atol=1e-5)
    np.testing.assert_allclose(jitted["audio"][0], eager["audio"][0], atol=1e-5)


def test_pgd_inside_a_train_step_treats_the_perturbation_as_a_constant(model):
    """Adversarial training: the attack runs on the traced model inside
    ``nnx.value_and_grad``; the parameter gradient is that of the loss at the
    adversarial batch computed outside, held fixed (Danskin / Madry et al.)."""
    from flax import nnx

    batch = _batch()
    net = nnx.clone(model)
    net.eval()  # deterministic, so inside and outside see the same function
    kwargs = {"eps": 0.5, "steps": 3, "norm": "l2", "key": jax.random.key(5)}

    def xent(m, b):
        return optax.softmax_cross_entropy_with_integer_labels(m(b), b["label"]).mean()

    @nnx.jit
    def inside(m):
        return nnx.grad(lambda m: xent(m, pgd(model_loss(m), batch, **kwargs)))(m)

    adv = pgd(net, batch, **kwargs)

    @nnx.jit
    def outside(m):
        return nnx.grad(lambda m: xent(m, adv))(m)

    got, want = nnx.state(inside(net)), nnx.state(outside(net))
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want)) > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 got, want)


# ------------------------------------------------------------------ robust accuracy


def test_robust_accuracy_against_attacking_the_whole_set_at_once(model):
    """ε = 0 gives the clean accuracy; each ε gives the accuracy on pgd() of the whole
    set in one batch (L∞ steps are the gradient's sign, so chunking does not change
    them); the curve does not rise, and falls."""
    from flax import nnx

    n = 11  # not a multiple of batch_size: the last chunk is padded
    data = _batch(n, seed=4)
    reference = nnx.clone(model)
    reference.eval()
    logits = nnx.jit(lambda m, b: m(b))
    clean = np.asarray(jnp.argmax(logits(reference, data), -1))
    data["label"] = clean.astype(np.int32)
    data["label"][:3] = (clean[:3] + 1) % 3  # exactly 8 of 11 correct
    eps_values = [0.0, 0.02, 0.1, 0.5]
    curve = robust_accuracy(model, data, eps_values=eps_values, batch_size=6, steps=4,
                            clip={"image": (0.0, 1.0)})
    assert curve.shape == (4,) and curve[0] == pytest.approx(8 / 11)
    for eps, acc in zip(eps_values, curve, strict=True):
        adv = pgd(model, data, eps=eps, steps=4, clip={"image": (0.0, 1.0)})
        expected = np.mean(np.asarray(jnp.argmax(logits(reference, adv), -1)) == data["label"])
        assert acc == pytest.approx(expected), eps
    assert np.all(np.diff(curve) <= 0) and curve[-1] < curve[0]


def test_robust_accuracy_counts_only_valid_rows_and_one_modality(model):
    """Rows with valid False are neither attacked nor counted: the accuracy of 9 rows
    of which 3 are invalid is that of the 6 valid ones alone, at every radius."""
    data = _batch(9, seed=5)
    data["valid"] = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0], bool)
    data["label"][6:] = 99  # would count as wrong
    kwargs = {"eps_values": [0.0, 0.3], "batch_size": 6, "steps": 2, "modalities": "image",
              "clip": {"image": (0.0, 1.0)}, "key": jax.random.key(0)}
    full = robust_accuracy(model, data, **kwargs)
    head = {k: (tuple(a[:6] for a in v) if isinstance(v, tuple) else v[:6])
            for k, v in data.items() if k != "valid"}
    np.testing.assert_array_equal(full, robust_accuracy(model, head, **kwargs))
    assert np.all(full * 6 == np.round(full * 6))  # counts over 6 rows, not 9


class _Linear(nnx.Module):
    """Two classes: logit 0 is 0, logit 1 is ``s = <w, image> + <v, log_mel> + b`` over
    the modalities it encodes (the log-mel's padded frames masked out)."""

    def __init__(self, w, v, b, modalities=("audio", "image")):
        self.modalities = tuple(sorted(modalities))
        self.w, self.v = nnx.Param(jnp.asarray(w)), nnx.Param(jnp.asarray(v))
        self.b = nnx.Param(jnp.asarray(b, jnp.float32))

    def __call__(self, batch):
        s = self.b[...] + jnp.zeros(batch["label"].shape, jnp.float32)
        if "image" in self.modalities:
            s = s + jnp.sum(batch["image"] * self.w[...][None], axis=(1, 2, 3))
        if "audio" in self.modalities:
            x, mask = batch["audio"]
            s = s + jnp.sum(jnp.where(mask[..., None], x * self.v[...][None], 0.0),
                            axis=(1, 2))
        return jnp.stack([jnp.zeros_like(s), s], axis=-1)


def _toy(n=10, seed=0):
    """A ``_Linear`` model with weights without zeros, images in [0.3, 0.7] (an attack
    of radius <= 0.25 never reaches the [0, 1] clip), padded log-mels, labels: about
    70 % correct. Returns ``(model, data, (w, v, b))``."""
    rng = np.random.default_rng(seed)
    w = (rng.choice([-1, 1], (3, 3, 1)) * rng.uniform(0.5, 1.5, (3, 3, 1))).astype(np.float32)
    v = (rng.choice([-1, 1], (5, 2)) * rng.uniform(0.5, 1.5, (5, 2))).astype(np.float32)
    lengths = rng.integers(2, 6, (n, 1))
    data = {"image": rng.uniform(0.3, 0.7, (n, 3, 3, 1)).astype(np.float32),
            "audio": (rng.normal(size=(n, 5, 2)).astype(np.float32),
                      np.arange(5)[None, :] < lengths),
            "label": rng.integers(0, 2, n).astype(np.int32)}
    b = -float(np.mean(np.sum(data["image"] * w, axis=(1, 2, 3))))
    return _Linear(w, v, b), data, (w, v, b)


def _margins(data, w, v, b):
    """``(2 y - 1) * s`` per example, and the L1 norms of w and of v over each example's
    valid frames (what an L∞ attack of radius 1 takes off the margin)."""
    x, mask = data["audio"]
    s = (b + np.sum(data["image"] * w, axis=(1, 2, 3))
         + np.sum(np.where(mask[..., None], x * v, 0.0), axis=(1, 2)))
    sign = 2 * data["label"] - 1
    return sign * s, np.abs(w).sum(), np.sum(mask[..., None] * np.abs(v), axis=(1, 2))


def test_robust_accuracy_per_modality_radii_is_the_hand_computed_worst_case():
    """For a two-class linear model the cross-entropy gradient's sign is constant, so
    L∞ PGD (10 steps of 0.25 eps from a random start) ends at the ball's worst corner:
    an example stays correct iff its margin exceeds eps_image * |w|_1 + eps_audio *
    |v over its valid frames|_1, each modality within its own radius (a radius of 0
    leaves one untouched). So does FGSM (one step from the clean input). One sweep
    mixes numbers and dicts; the accuracy never rises with the radius."""
    model, data, (w, v, b) = _toy(n=10)
    margin, w1, v1 = _margins(data, w, v, b)
    radii = (0.005, 0.02, 0.05, 0.1)
    sweep = [0.0] + [{"image": e, "audio": a} for e in radii
                     for a in (0.0, 2 * e)] + [{"image": 0.0, "audio": 2 * e} for e in radii]
    worst = [0.0] + [e * w1 + a * v1 for e in radii for a in (0.0, 2 * e)] + [
        2 * e * v1 for e in radii]
    for loss in worst:
        assert np.min(np.abs(margin - loss)) > 1e-4  # the test is well posed
    expected = [np.mean(margin - loss > 0) for loss in worst]
    attack = dict(batch_size=4, clip={"image": (0.0, 1.0)},  # 3 chunks, the last padded
                  modalities=("image", "audio"), key=jax.random.key(3))
    got = robust_accuracy(model, data, eps_values=sweep, steps=10, **attack)
    np.testing.assert_array_equal(got, expected)
    assert 0.3 < got[0] < 1.0 and got[0] == np.mean(margin > 0)
    assert got[-1] < got[0] and got[-5] < got[0]  # both, and the audio alone, hurt
    for curve in (got[1:9:2], got[2:9:2], got[9:]):  # image; both; audio
        assert np.all(np.diff(curve) <= 0)
    fgsm_sweep = [{"image": e, "audio": 2 * e} for e in radii]
    np.testing.assert_array_equal(
        robust_accuracy(model, data, eps_values=fgsm_sweep, attack="fgsm", **attack),
        got[2:9:2])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_robust_accuracy_dicts_of_radii_equal_the_number_form(norm):
    """A dict with equal radii (and step sizes) is the number form; a dict with a zero
    radius is attacking the other modality alone (random starts follow the modality's
    name), both from the same key; L2 from the clean input (no key): 10 steps of 0.25
    eps along w / |w|_2 reach eps * w / |w|_2 exactly, taking eps * |w|_2 off."""
    model, data, (w, v, b) = _toy(n=7, seed=1)
    kwargs = dict(batch_size=3, norm=norm, steps=4, key=jax.random.key(0))
    both = ("image", "audio")
    radii = [0.0, 0.05, 0.2]
    number = robust_accuracy(model, data, eps_values=radii, modalities=both, **kwargs)
    np.testing.assert_array_equal(number, robust_accuracy(
        model, data, eps_values=[{"image": e, "audio": e} for e in radii],
        modalities=both, **kwargs))
    np.testing.assert_array_equal(
        robust_accuracy(model, data, eps_values=radii, modalities=both, step_size=0.03,
                        **kwargs),
        robust_accuracy(model, data, eps_values=radii, modalities=both,
                        step_size={"image": 0.03, "audio": 0.03}, **kwargs))
    for alone, other in (("audio", "image"), ("image", "audio")):
        np.testing.assert_array_equal(
            robust_accuracy(model, data, eps_values=[{alone: e, other: 0.0} for e in radii],
                            modalities=both, **kwargs),
            robust_accuracy(model, data, eps_values=radii, modalities=alone, **kwargs))
    if norm == "l2":
        margin, _, _ = _margins(data, w, v, b)
        radii = (0.1, 0.3, 1.0)
        for e in radii:
            assert np.min(np.abs(margin - e * np.linalg.norm(w))) > 1e-4
        got = robust_accuracy(model, data, eps_values=[{"image": e, "audio": 0.0}
                                                       for e in radii],
                              modalities=both, norm="l2", steps=10, batch_size=7)
        np.testing.assert_array_equal(
            got, [np.mean(margin > e * np.linalg.norm(w)) for e in radii])


# ------------------------------------------------------------------- bad arguments


def _loss(b):
    return jnp.sum(b["image"])


def _text_batch():
    return {**_batch(2), "text": (np.zeros((2, 5), np.int32), np.ones((2, 5), bool))}


@pytest.mark.parametrize("kwargs, error, match", [
    ({"eps": -0.1}, ValueError, r"eps: expected a finite number >= 0"),
    ({"eps": float("nan")}, ValueError, r"eps: "),
    ({"eps": "big"}, TypeError, r"eps: expected a number"),
    ({"eps": {"image": 0.1}}, ValueError, r"eps: .*missing \['audio'\]"),
    ({"eps": {"image": -1.0, "audio": 0.1}}, ValueError, r"eps\['image'\]"),
    ({"steps": 0}, ValueError, r"steps: expected a positive integer"),
    ({"steps": 2.5}, ValueError, r"steps: "),
    ({"step_size": 0.0}, ValueError, r"step_size: expected a finite number > 0"),
    ({"step_size": {"image": 0.1}}, ValueError, r"step_size: .*missing \['audio'\]"),
    ({"norm": "l1"}, ValueError, r"norm: expected one of \['linf', 'l2'\]"),
    ({"modalities": "video"}, ValueError, r"modalities: the batch has no modality 'video'"),
    ({"modalities": "label"}, ValueError, r"modalities: 'label' is a reserved batch key"),
    ({"modalities": []}, ValueError, r"modalities: expected at least one"),
    ({"modalities": "text"}, TypeError, r"modalities: 'text' is not a continuous input"),
    ({"clip": {"image": (1.0, 0.0)}}, ValueError, r"clip\['image'\]: expected low <= high"),
    ({"clip": {"audio": (0, 1)}, "modalities": "image"}, ValueError,
     r"clip: 'audio' is not an attacked modality"),
    ({"clip": (0.0, 1.0)}, TypeError, r"clip: expected a dict"),
    ({"key": 0}, TypeError, r"key: expected a PRNG key"),
    ({"key": jax.random.split(jax.random.key(0))}, ValueError, r"key: expected a single"),
])
def test_pgd_rejects_bad_arguments(kwargs, error, match):
    kwargs = {"eps": 0.1, "steps": 2, **kwargs}
    with pytest.raises(error, match=match):
        pgd(_loss, _text_batch(), **kwargs)


def test_fgsm_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="eps: "):
        fgsm(_loss, _batch(), eps=-1.0)
    with pytest.raises(ValueError, match="norm: "):
        fgsm(_loss, _batch(), eps=0.1, norm="inf")
    with pytest.raises(TypeError, match="loss_fn: expected a function"):
        fgsm("loss", _batch(), eps=0.1)
    with pytest.raises(TypeError, match="batch: expected a dict"):
        fgsm(_loss, [1, 2], eps=0.1)
    with pytest.raises(ValueError, match="loss_fn: expected a scalar loss"):
        fgsm(lambda b: b["image"].sum(axis=(1, 2, 3)), _batch(), eps=0.1)
    # A modality the batch has but the model does not encode.
    batch = {**_batch(2), "depth": np.zeros((2, 4, 4, 1), np.float32)}
    with pytest.raises(ValueError, match="modalities: the model has no encoder for 'depth'"):
        fgsm(model, batch, eps=0.1, modalities="depth")
    with pytest.raises(TypeError, match="modalities: 'text' is not a continuous input"):
        fgsm(_loss, _text_batch(), eps=0.1, modalities=["image", "text"])
    with pytest.raises(ValueError, match="modalities: the batch has no continuous"):
        fgsm(_loss, {"text": np.zeros((2, 5), np.int32)}, eps=0.1)
    with pytest.raises(TypeError, match="task: expected a lepton_mm.models.tasks task"):
        model_loss(model, task="classification")

    class Unhashable:
        __hash__ = None

        def loss(self, outputs, batch, valid):
            return outputs.sum()

    with pytest.raises(TypeError, match="task: expected a hashable task"):
        model_loss(model, task=Unhashable())
    with pytest.raises(TypeError, match="model: "):
        model_loss(_loss)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"eps_values": [0.1, -1.0]}, ValueError, r"eps_values\[1\]: expected a finite"),
    ({"eps_values": []}, ValueError, r"eps_values: expected at least one"),
    ({"eps_values": 0.1}, TypeError, r"eps_values: expected a sequence"),
    ({"batch_size": 0}, ValueError, r"batch_size: expected a positive integer"),
    ({"steps": 0}, ValueError, r"steps: expected a positive integer"),
    ({"norm": "L2"}, ValueError, r"norm: "),
    ({"modalities": "text"}, ValueError, r"modalities: the model has no encoder for 'text'"),
    ({"step_size": -0.1}, ValueError, r"step_size: "),
    ({"eps_values": [0.1, {"image": 0.1}]}, ValueError,
     r"eps_values\[1\]: expected a number or one entry per attacked modality "
     r"\['audio', 'image'\]; missing \['audio'\]"),
    ({"eps_values": [{"image": 0.1, "audio": 0.1, "video": 0.1}]}, ValueError,
     r"eps_values\[0\]: .*unexpected \['video'\]"),
    ({"eps_values": [{"image": 0.1, "audio": 0.1}], "modalities": "image"}, ValueError,
     r"eps_values\[0\]: .*unexpected \['audio'\]"),
    ({"eps_values": [{"image": 0.1, "audio": -0.1}]}, ValueError,
     r"eps_values\[0\]\['audio'\]: expected a finite number >= 0"),
    ({"eps_values": [{"image": "big", "audio": 0.1}]}, TypeError,
     r"eps_values\[0\]\['image'\]: expected a number"),
    ({"eps_values": {"image": 0.1, "audio": 0.1}}, TypeError,
     r"eps_values: expected a sequence .*wrap it in a list"),
    ({"step_size": {"image": 0.1}}, ValueError, r"step_size: .*missing \['audio'\]"),
    ({"step_size": {"image": 0.1, "audio": 0.0}}, ValueError,
     r"step_size\['audio'\]: expected a finite number > 0"),
    ({"attack": "cw"}, ValueError, r"attack: expected 'pgd' or 'fgsm', got 'cw'"),
    ({"attack": "fgsm", "step_size": 0.1}, ValueError, r"step_size: FGSM takes one step"),
])
def test_robust_accuracy_rejects_bad_arguments(model, kwargs, error, match):
    kwargs = {"eps_values": [0.0], "batch_size": 2, **kwargs}
    with pytest.raises(error, match=match):
        robust_accuracy(model, _text_batch(), **kwargs)


def test_robust_accuracy_rejects_bad_data_and_models(model):
    data = _batch(3)
    with pytest.raises(ValueError, match="data: expected a 'label'"):
        robust_accuracy(model, {k: v for k, v in data.items() if k != "label"},
                        eps_values=[0.0], batch_size=2)
    with pytest.raises(ValueError, match="batch: missing modality 'audio'"):
        robust_accuracy(model, {k: v for k, v in data.items() if k != "audio"},
                        eps_values=[0.0], batch_size=2, modalities="image")
    with pytest.raises(TypeError, match="model: expected a flax.nnx.Module"):
        robust_accuracy(_loss, data, eps_values=[0.0], batch_size=2)
