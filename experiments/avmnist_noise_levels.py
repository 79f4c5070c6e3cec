"""How AV-MNIST's image-noise sweep levels were checked: on validation, never on test.

For every image-bearing run of ``experiments/avmnist.py`` whose checkpoint is in the
workdir, prints the best checkpoint's validation accuracy with white Gaussian noise of
each sweep level (and a few levels between and beyond) added to the images, drawn from
``fold_in(key(data_seed), 2000)`` (not the test sweep's key). ``docs/results.md`` quotes
the result; it takes the same selection flags as ``avmnist.py``:

    python experiments/avmnist_noise_levels.py --fusion image_only --seeds 0
"""

from __future__ import annotations

import sys

import avmnist  # experiments/avmnist.py: the runs' workdirs and the command line
import numpy as np

from lepton_mm.recipes.avmnist import AVMNISTConfig, build_model, make_data

#: Extra levels printed between and beyond the sweep's.
NOISE_PROBE = (0.05, 0.15, 0.4, 0.6, 1.5)
_VAL_NOISE_TAG = 2000


def validate_image_noise(config: AVMNISTConfig) -> dict[str, dict[float, float]]:
    """``{"<method>/seed<k>": {sigma: validation accuracy}}`` (also printed) of every
    image-bearing run of ``config`` with a checkpoint (others are reported skipped)."""
    import jax

    from lepton_mm.robustness import ConditionEvaluator, add_gaussian_noise
    from lepton_mm.training import load_model, seed_rngs

    experiment, val = avmnist.AVMNIST(config), make_data(config)["val"]
    key = jax.random.fold_in(jax.random.key(config.data_seed), _VAL_NOISE_TAG)
    index = np.arange(len(val["label"]))
    out = {}
    for k in experiment.keys():
        workdir = experiment.workdir(k)
        if k.method == "audio_only" or not workdir.exists():
            print(f"{k.label()}: skipped (audio only, or no checkpoint in {workdir})")
            continue
        model = load_model(workdir, lambda m=k.method, s=k.seed: build_model(
            config, m, seed_rngs(s)))
        evaluator = ConditionEvaluator(model, config.eval_batch_size or config.batch_size)
        curve = {}
        for sigma in sorted({*config.image_noise_sweep, *NOISE_PROBE}):
            images = val["image"] if sigma == 0 else np.asarray(add_gaussian_noise(
                val["image"], sigma, key=key, example_index=index))
            curve[sigma] = evaluator.accuracy({**val, "image": images})
        out[f"{k.method}/seed{k.seed}"] = curve
        print(f"{k.label()} validation accuracy (%): " + ", ".join(
            f"σ {s:g}: {100 * a:.1f}" for s, a in curve.items()), flush=True)
    return out


if __name__ == "__main__":
    validate_image_noise(avmnist.parse_args()[0])
    sys.exit(0)
