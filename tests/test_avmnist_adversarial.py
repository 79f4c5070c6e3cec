"""experiments/avmnist_adversarial.py: accuracy under attack on a linear model whose
worst case is known by hand, the n/a rule for unimodal models, the table, the figure and
the command line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx


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
    """Weights without zeros, images in [0.3, 0.7] (an attack of radius <= 0.25 never
    reaches the [0, 1] clip), padded log-mels, labels: about 70 % correct."""
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


def test_linf_pgd_accuracy_is_the_hand_computed_worst_case(load_script):
    """For a two-class linear model the cross-entropy gradient's sign is constant, so
    L∞ PGD (10 steps of 0.25 eps from a random start) ends at the ball's worst corner:
    an example stays correct iff its margin exceeds eps_image * |w|_1 + eps_audio *
    |v over its valid frames|_1. Eps 0 is the clean accuracy; the accuracy never rises
    with eps; the random start is reproducible."""
    script = load_script("avmnist_adversarial")
    model, data, (w, v, b) = _toy(n=10)
    margin, w1, v1 = _margins(data, w, v, b)
    attack = dict(norm="linf", steps=10, clip={"image": (0.0, 1.0)},
                  key=jax.random.key(3), batch_size=4)  # 3 chunks, the last padded
    clean = script.accuracy_under_attack(model, data, eps=None, **attack)
    assert clean == np.mean(margin > 0) and 0.3 < clean < 1.0
    assert script.accuracy_under_attack(model, data, eps={"image": 0.0, "audio": 0.0},
                                        **attack) == clean
    previous = {}
    for e in (0.0, 0.005, 0.02, 0.05, 0.1):
        for target, loss in (({"image": e}, e * w1), ({"audio": 2 * e}, 2 * e * v1),
                             ({"image": e, "audio": 2 * e}, e * w1 + 2 * e * v1)):
            remaining = margin - loss
            assert np.min(np.abs(remaining)) > 1e-4  # the test is well posed
            got = script.accuracy_under_attack(model, data, eps=target, **attack)
            assert got == np.mean(remaining > 0), (target, got)
            name = tuple(target)
            assert got <= previous.get(name, 1.0)
            previous[name] = got
    assert previous[("image", "audio")] < clean
    again = script.accuracy_under_attack(model, data, eps={"audio": 0.1}, **attack)
    assert again == previous[("audio",)]


def test_one_modality_matches_robust_accuracy_and_l2_from_the_clean_input(load_script):
    from lepton_mm.adversarial import robust_accuracy

    script = load_script("avmnist_adversarial")
    model, data, (w, v, b) = _toy(n=7, seed=1)
    key = jax.random.key(0)
    for norm in ("linf", "l2"):
        expected = robust_accuracy(model, data, eps_values=[0.0, 0.05, 0.2], batch_size=3,
                                   modalities="audio", norm=norm, steps=4, key=key)
        got = [script.accuracy_under_attack(model, data, eps={"audio": e}, norm=norm,
                                            steps=4, key=key, batch_size=3)
               for e in (0.0, 0.05, 0.2)]
        np.testing.assert_array_equal(got, expected)
    # L2 from the clean input (no key): 10 steps of 0.25 eps along w / |w|_2 reach
    # eps * w / |w|_2 exactly, taking eps * |w|_2 off the margin.
    margin, _, _ = _margins(data, w, v, b)
    for e in (0.1, 0.3, 1.0):
        assert np.min(np.abs(margin - e * np.linalg.norm(w))) > 1e-4
        got = script.accuracy_under_attack(model, data, eps={"image": e}, norm="l2",
                                           steps=10, key=None, batch_size=7)
        assert got == np.mean(margin > e * np.linalg.norm(w))


def test_unimodal_models_are_attacked_on_their_own_modality_only(load_script):
    from lepton_mm.recipes.avmnist import build_model, quick_config

    script = load_script("avmnist_adversarial")
    assert script.attacked(("audio", "image"), "both") == ("image", "audio")
    assert script.attacked(("image",), "image") == ("image",)
    assert script.attacked(("image",), "audio") is None
    assert script.attacked(("image",), "both") is None
    recipe = build_model(quick_config(), "audio_only", nnx.Rngs(0))  # no forward pass
    assert [script.attacked(recipe.modalities, t) for t in script.TARGETS] == [
        None, ("audio",), None]

    model, data, _ = _toy(n=6, seed=2)
    image_only = _Linear(model.w[...], model.v[...], model.b[...], modalities=("image",))
    settings = script.AdversarialConfig(
        methods=("image_only",), seeds=(0,), image_linf=(0.02, 0.1), audio_linf=(0.1, 0.3),
        image_l2=(0.1,), audio_l2=(0.5,), steps=3, batch_size=4)
    record = script.evaluate(image_only, data, settings)
    assert record["n/a"] == ["audio", "both"]
    assert record["modalities"] == ["image"] and record["num_test"] == 6
    rows = [(a["attack"], a["target"], a["norm"], a["level"], a["eps"], a["steps"])
            for a in record["attacks"]]
    assert rows == [("pgd", "image", "linf", 1, {"image": 0.02}, 3),
                    ("pgd", "image", "linf", 2, {"image": 0.1}, 3),
                    ("fgsm", "image", "linf", 2, {"image": 0.1}, 1),
                    ("pgd", "image", "l2", 1, {"image": 0.1}, 3)]
    lines = script.table({"image_only/seed0": record}).splitlines()
    assert any(line.startswith("| image_only | audio | 1 |") and line.endswith(
        "| n/a | n/a | n/a |") for line in lines)
    assert any(line.startswith("| image_only | both | 1 |") for line in lines)


def test_table_and_figure_from_results(load_script, tmp_path):
    script = load_script("avmnist_adversarial")

    def record(clean, image, both, na=()):
        attacks = [{"attack": "pgd", "target": "image", "norm": "linf", "level": k + 1,
                    "eps": {"image": e}, "steps": 10, "accuracy": a}
                   for k, (e, a) in enumerate(zip((0.01, 0.1), image, strict=True))]
        if both is not None:
            attacks.append({"attack": "pgd", "target": "both", "norm": "linf", "level": 1,
                            "eps": {"image": 0.01, "audio": 0.03}, "steps": 10,
                            "accuracy": both})
        return {"clean_accuracy": clean, "attacks": attacks, "n/a": list(na)}

    results = {"concat/seed0": record(0.8, (0.6, 0.1), 0.2),
               "concat/seed1": record(0.7, (0.5, 0.1), 0.3),
               "image_only/seed0": record(0.6, (0.4, 0.0), None, na=("both",))}
    text = script.table(results)
    lines = text.splitlines()
    assert lines[0].startswith("**PGD-10, L∞**")
    assert "image 0.01 / 0.1; both 0.01+0.03" in lines[0]
    assert "| method | attacked | seeds | clean | level 1 | level 2 |" in lines
    assert "| concat | image | 2 | 75.0 ± 7.1 | 55.0 ± 7.1 | 10.0 ± 0.0 |" in lines
    assert "| concat | both | 2 | 75.0 ± 7.1 | 25.0 ± 7.1 |  |" in lines
    assert "| image_only | both | 1 | 60.0 | n/a | n/a |" in lines
    path = script.plot(results, tmp_path / "adversarial.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_name_the_field(load_script, capsys):
    script = load_script("avmnist_adversarial")
    for argv, name in ((["--fusion", "concat,nope"], "methods"),
                       (["--image-linf=-0.1,0.1"], "image_linf"),
                       (["--audio-l2", "0.3,0.1"], "audio_l2"),
                       (["--steps", "0"], "steps"),
                       (["--batch-size", "0"], "batch_size"),
                       (["--targets", "image,text"], "targets"),
                       (["--audio-linf", "0.01"], "audio_linf"),  # both: 3 image levels
                       (["--image-clip", "1,0"], "image_clip")):
        with pytest.raises(SystemExit) as e:
            script.parse_args(argv)
        assert e.value.code == 2, argv
        assert name in capsys.readouterr().err, argv
    settings = script.parse_args(["--fusion", "concat+mdrop,audio_only", "--targets",
                                  "audio", "--audio-linf", "0.01", "--image-clip", "none"])
    assert settings.methods == ("concat+mdrop", "audio_only")
    assert settings.image_clip is None and settings.audio_linf == (0.01,)
