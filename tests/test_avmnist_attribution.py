"""experiments/avmnist_attribution.py: the per-run Shapley summary, on a model whose
Shapley values are known by hand, and its command line."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx


class _Additive(nnx.Module):
    """logits = [image present] * a + [audio present] * b + [both] * c (per class).

    With two players the Shapley value of the image for class k is
    ``a_k + c_k / 2`` (and ``b_k + c_k / 2`` for the audio), whatever the inputs hold.
    """

    def __init__(self, a, b, c):
        self.a, self.b, self.c = (nnx.Param(jnp.asarray(v, jnp.float32)) for v in (a, b, c))

    def __call__(self, batch):
        size = batch["image"].shape[0]
        present = batch.get("present") or {}
        image = present.get("image", jnp.ones((size,), bool)).astype(jnp.float32)[:, None]
        audio = present.get("audio", jnp.ones((size,), bool)).astype(jnp.float32)[:, None]
        a, b, c = (v[...][None, :] for v in (self.a, self.b, self.c))
        return image * a + audio * b + image * audio * c


def test_summary_matches_hand_computed_shapley_values(load_script):
    script = load_script("avmnist_attribution")
    rng = np.random.default_rng(0)
    a, b, c = (rng.uniform(0.5, 2.0, size=10) for _ in range(3))
    a[3], b[3], c[3] = 9.0, 1.0, 2.0  # class 3 predicted for every example
    labels = np.array([3, 3, 3, 1, 1], np.int32)
    test = {"image": np.zeros((5, 28, 28, 1), np.float32),
            "audio": (np.zeros((5, 126, 64), np.float32), np.ones((5, 126), bool)),
            "label": labels}
    out = script.explain(_Additive(a, b, c), test, batch_size=2)  # 3 calls, one partial
    phi_image, phi_audio = 9.0 + 1.0, 1.0 + 1.0
    assert out["num_test"] == 5
    assert out["accuracy"] == pytest.approx(0.6)
    assert out["phi"]["image"] == pytest.approx(phi_image, rel=1e-6)
    assert out["phi"]["audio"] == pytest.approx(phi_audio, rel=1e-6)
    assert out["full_minus_base"] == pytest.approx(12.0, rel=1e-6)
    assert out["completeness_max_error"] < 1e-5
    assert out["share"]["image"] == pytest.approx(10 / 12, rel=1e-6)
    assert out["share"]["image"] + out["share"]["audio"] == pytest.approx(1.0)
    assert out["decides"] == {"image": 1.0, "audio": 0.0}
    assert out["share_by_class"]["3"] == pytest.approx(10 / 12, rel=1e-6)
    assert out["share_by_class"]["0"] is None  # no example of class 0


def test_table_and_figure_from_results(load_script, tmp_path):
    script = load_script("avmnist_attribution")
    run = lambda share: {"share": {"image": share, "audio": 1 - share},
                         "abs_share": {"image": share, "audio": 1 - share},
                         "decides": {"image": share, "audio": 1 - share},
                         "phi": {"image": 4 * share, "audio": 4 * (1 - share)},
                         "accuracy": 0.8, "completeness_max_error": 1e-7}
    results = {"concat/seed0": run(0.6), "concat/seed1": run(0.5), "film/seed0": run(0.3)}
    lines = script.table(results).splitlines()
    assert lines[2].startswith("| concat | 2 | 55.0 ± 7.1 |")
    assert lines[3].startswith("| film | 1 | 30.0 |")
    path = script.plot(results, tmp_path / "shares.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_name_the_flag(load_script, capsys):
    script = load_script("avmnist_attribution")
    assert script.parse_args(["--fusion", "concat+ogm_ge"]).methods == ("concat+ogm_ge",)
    for argv, flag in ((["--fusion", "image_only"], "methods"),
                       (["--fusion", "audio_only+snr_range"], "methods"),
                       (["--batch-size", "0"], "batch_size")):
        with pytest.raises(SystemExit) as e:
            script.parse_args(argv)
        assert e.value.code == 2
        assert flag in capsys.readouterr().err


def test_load_trained_finds_a_variant_run_by_its_record(load_script, tmp_path):
    # A +adv run's folder is named by its recorded config hash, which the defaults do
    # not give: the record is what locates it.
    import json

    from lepton_mm import experiment as ledger
    from lepton_mm.recipes.avmnist import AVMNISTConfig

    compress = load_script("avmnist_compress")
    record = tmp_path / "results" / "avmnist" / "concat+adv" / "seed1.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"config_hash": "feed", "numerics": "n1"}))
    tag = ledger.config_hash({"config": "feed", "numerics": "n1"})[:8]
    config = AVMNISTConfig(workdir=str(tmp_path / "runs"), results=str(tmp_path / "results"))
    with pytest.raises(FileNotFoundError, match=f"concat\\+adv/seed1-{tag}: no checkpoints"):
        compress.load_trained(config, "concat+adv", 1)
    with pytest.raises(FileNotFoundError, match="concat/seed1-[0-9a-f]{8}: no checkpoints"):
        compress.load_trained(config, "concat", 1)  # no record: the config's own hash
