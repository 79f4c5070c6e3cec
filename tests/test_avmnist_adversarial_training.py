"""experiments/avmnist.py's ``+adv`` runs: PGD adversarial training as a recipe option
(``adversarial_image_eps`` / ``adversarial_audio_eps`` / ``adversarial_steps``)."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from lepton_mm.experiment import RunKey

ADV = ["--adversarial-image-eps", "0.03", "--adversarial-audio-eps", "0.01"]


def test_adversarial_variants_are_runs_of_their_own(avmnist):
    config, _ = avmnist.parse_args(["--fusion", "image_only,audio_only,concat", *ADV])
    assert avmnist.resolve_methods(config) == [
        "image_only", "image_only+adv", "audio_only", "audio_only+adv", "concat",
        "concat+adv"]
    assert avmnist.variant_tags("concat+adv") == ("adv",)
    experiment = avmnist.AVMNIST(config)
    for method in ("image_only", "audio_only", "concat"):  # the plain runs are untouched
        plain = avmnist.AVMNIST(avmnist.AVMNISTConfig()).run_config(method)
        assert experiment.run_config(method) == plain
    setting = {"attack": "pgd", "norm": "linf", "eps": {"image": 0.03, "audio": 0.01},
               "steps": 3, "step_size": "2.5 * eps / steps", "random_start": True,
               "clip": {"image": [0.0, 1.0]}, "batch": "adversarial"}
    assert experiment.run_config("concat+adv") == {
        **plain, "method": "concat+adv", "adversarial_training": setting,
        "robustness": {**plain["robustness"], "adversarial_training": setting}}
    # A unimodal run records (and its command carries) only its own modality's radius.
    audio = experiment.run_config("audio_only+adv")["adversarial_training"]
    assert audio["eps"] == {"audio": 0.01} and audio["clip"] == {}
    command = experiment.command(RunKey("avmnist", "audio_only+adv", 0))
    assert "--adversarial-audio-eps 0.01 --adversarial-steps 3" in command
    assert "image-eps" not in command
    hashes = set()
    for method in avmnist.resolve_methods(config):
        key = RunKey("avmnist", method, 1)
        again, _ = avmnist.parse_args(experiment.command(key).split()[2:])
        assert key in avmnist.AVMNIST(again).keys(), method
        assert avmnist.AVMNIST(again).config_hash(key) == experiment.config_hash(key)
        hashes.add(experiment.config_hash(key))
    assert len(hashes) == 6
    # Another image radius is another image-bearing run, the same audio_only+adv run;
    # another step count another run of each.
    other = avmnist.AVMNIST(dataclasses.replace(config, adversarial_image_eps=0.1))
    for method, same in (("image_only+adv", False), ("audio_only+adv", True),
                         ("concat+adv", False), ("concat", True)):
        key = RunKey("avmnist", method, 1)
        assert (other.config_hash(key) == experiment.config_hash(key)) == same, method
    fgsm = avmnist.AVMNIST(dataclasses.replace(config, adversarial_steps=1))
    assert fgsm.run_config("concat+adv")["adversarial_training"]["step_size"] == "1.25 * eps"
    assert fgsm.config_hash(RunKey("avmnist", "concat+adv", 1)) not in hashes
    # An image radius alone: no audio_only+adv, and concat+adv attacks the image only.
    image, _ = avmnist.parse_args(["--fusion", "image_only,audio_only,concat",
                                   "--adversarial-image-eps", "0.03"])
    assert avmnist.resolve_methods(image) == [
        "image_only", "image_only+adv", "audio_only", "concat", "concat+adv"]
    assert avmnist.adversarial_setting(image, "concat+adv")["eps"] == {"image": 0.03}
    assert avmnist.adversarial_training(image, "concat") is None
    # A config without the radii cannot name a +adv run's checkpoints: it says so.
    with pytest.raises(ValueError, match=r"^audio_only\+adv: no modality .* radius > 0"):
        avmnist.AVMNIST(image).workdir(RunKey("avmnist", "audio_only+adv", 0))
    # The adversary is one object per setting (fit's compiled step is shared by seeds).
    assert avmnist.adversarial_training(config, "concat+adv") is \
        avmnist.adversarial_training(dataclasses.replace(config), "concat+adv")


def test_bad_adversarial_settings_name_the_argument(avmnist, capsys):
    for bad, name in (({"adversarial_image_eps": -0.1}, "adversarial_image_eps"),
                      ({"adversarial_audio_eps": float("nan")}, "adversarial_audio_eps"),
                      ({"adversarial_image_eps": "0.1"}, "adversarial_image_eps"),
                      ({"adversarial_steps": 0}, "adversarial_steps"),
                      ({"adversarial_steps": 1.5}, "adversarial_steps")):
        with pytest.raises(ValueError, match=f"^{name}: expected"):
            avmnist.AVMNISTConfig(**bad)
    for argv, message in ((["--adversarial-image-eps=-0.1"], "adversarial_image_eps: "
                                                             "expected a finite number >= 0"),
                          (["--adversarial-steps", "0"], "adversarial_steps: expected an "
                                                         "integer >= 1, got 0"),
                          (["--adversarial-audio-eps", "x"], "argument "
                                                             "--adversarial-audio-eps")):
        with pytest.raises(SystemExit) as exit_info:
            avmnist.parse_args(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ": error: " in err[0] and message in err[0], err


def _tiny_avmnist(n, seed):
    """AV-MNIST-shaped arrays: images mostly in [0, 1] (some outside, as the PCA
    reconstructions), standardised log-mels with padded frames."""
    rng = np.random.default_rng(seed)
    mask = np.ones((n, 126), bool)
    mask[:, 100:] = rng.random((n, 1)) < 0.5  # half the examples padded after 100 frames
    return {"image": rng.uniform(-0.1, 1.1, (n, 28, 28, 1)).astype(np.float32),
            "audio": (rng.standard_normal((n, 126, 64)).astype(np.float32), mask),
            "label": rng.integers(0, 10, n).astype(np.int32)}


class _Frames(nnx.Module):
    """A cheap audio encoder (per-frame projection, masked mean): the LeNets' train step
    takes ~20 s of CPU to compile at the tests' XLA level, this model ~3 s."""

    def __init__(self, features, dim, rngs):
        self.dim = dim
        self.proj = nnx.Linear(features, dim, rngs=rngs)

    def __call__(self, x, mask):
        from lepton_mm.types import EncoderOutput

        return EncoderOutput.from_tokens(jax.numpy.tanh(self.proj(x)), mask)


def test_recipe_trains_on_bounded_adversarial_batches(tmp_path):
    """Three steps of ``fit_recipe`` with the ``+adv`` adversary (a small concat model on
    AV-MNIST's input shapes): it is called once per step, moves every batch within each
    modality's radius (images kept in [0, 1] unless already outside, padded frames
    untouched, a fresh random start per step), and the parameters stay finite."""
    from lepton_mm.encoders import ImageCNN
    from lepton_mm.models import build_classifier
    from lepton_mm.recipes.avmnist import AVMNISTConfig, adversarial_training, fit_recipe
    from lepton_mm.training import seed_rngs

    config = AVMNISTConfig(batch_size=8, checkpoint_every=None, progress=False,
                           adversarial_image_eps=0.03, adversarial_audio_eps=0.01,
                           adversarial_steps=2)
    adversary = adversarial_training(config, "concat+adv")
    seen = []

    def record(before, after):
        seen.append(jax.tree.map(np.asarray, (before, after)))

    def watched(model, batch, key):
        out = adversary(model, batch, key)
        jax.debug.callback(record, batch, out)
        return out

    rngs = seed_rngs(0)
    model = build_classifier({"image": ImageCNN(1, dim=6, widths=(4,), rngs=rngs),
                              "audio": _Frames(64, 6, rngs)}, "concat", num_outputs=10,
                             fusion_dim=8, rngs=rngs)
    data = {"train": _tiny_avmnist(24, 0), "val": _tiny_avmnist(8, 1)}
    result = fit_recipe(config, model, data, tmp_path, seed=0, epochs=1, adversary=watched)
    jax.effects_barrier()
    assert result.step == 3 and len(seen) == 3
    for before, after in seen:
        image, adv_image = before["image"], after["image"]
        moved = np.abs(adv_image - image)
        assert moved.max() <= 0.03 + 1e-6 and moved.max() > 0.01  # random start + PGD
        inside = (image >= 0) & (image <= 1)
        assert np.all((adv_image[inside] >= 0) & (adv_image[inside] <= 1))
        assert np.all(adv_image[image < 0] >= image[image < 0])  # never pushed further out
        assert np.all(adv_image[image > 1] <= image[image > 1])
        (log_mel, mask), (adv_mel, adv_mask) = before["audio"], after["audio"]
        np.testing.assert_array_equal(adv_mask, mask)
        delta = np.abs(adv_mel - log_mel)
        assert delta.max() <= 0.01 + 1e-6 and delta[mask].max() > 0.003
        assert np.all(delta[~mask] == 0)  # padded frames never perturbed
        np.testing.assert_array_equal(after["label"], before["label"])
    # Each step draws its own start: the steps' perturbations differ.
    first, second = (after["image"] - before["image"] for before, after in seen[:2])
    assert not np.allclose(first, second)
    assert np.isfinite(result.history[-1]["train_loss"])
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert leaves and all(np.all(np.isfinite(np.asarray(p))) for p in leaves)
