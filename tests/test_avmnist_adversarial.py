"""experiments/avmnist_adversarial.py: each run's record on a linear model whose worst
case is known by hand, the n/a rule for unimodal models, the table, the figure and the
command line."""

import dataclasses
import shlex

import numpy as np
import pytest
from flax import nnx
from test_adversarial import _Linear, _margins, _toy  # linear model, hand-computed margins


def test_evaluate_attacks_each_modality_within_its_own_radius(load_script):
    """On a two-class linear model L∞ PGD and FGSM end at the ball's worst corner
    (tests/test_adversarial.py), so every record's accuracy is known by hand: margin >
    eps_image * |w|_1 + eps_audio * |v over the valid frames|_1, level k of ``both``
    pairing the k-th image and audio radii; the clean accuracy is the margin's sign."""
    script = load_script("avmnist_adversarial")
    model, data, (w, v, b) = _toy(n=10)
    margin, w1, v1 = _margins(data, w, v, b)
    settings = script.AdversarialConfig(
        methods=("concat",), seeds=(0,), image_linf=(0.005, 0.02, 0.05),
        audio_linf=(0.01, 0.04, 0.1), image_l2=(), audio_l2=(), steps=10, batch_size=4)
    record = script.evaluate(model, data, settings)  # 3 chunks, the last padded
    assert record["clean_accuracy"] == np.mean(margin > 0) and record["n/a"] == []
    assert [(a["attack"], a["target"], a["level"]) for a in record["attacks"]] == [
        (attack, target, level) for target in script.TARGETS
        for attack, level in (("pgd", 1), ("pgd", 2), ("pgd", 3), ("fgsm", 2))]
    assert record["attacks"][-1]["eps"] == {"image": 0.02, "audio": 0.04}
    for a in record["attacks"]:
        loss = a["eps"].get("image", 0.0) * w1 + a["eps"].get("audio", 0.0) * v1
        assert np.min(np.abs(margin - loss)) > 1e-4  # the test is well posed
        assert a["accuracy"] == np.mean(margin - loss > 0), a
    assert record["attacks"][-2]["accuracy"] < record["clean_accuracy"]


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
    results["concat/seed1"]["attacks"][-1]["eps"] = {"audio": 0.03, "image": 0.01}  # JSON
    assert script.table(results).splitlines()[0] == lines[0]  # order: image, then audio
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


def test_records_make_the_table_span_sessions(load_script, tmp_path, monkeypatch):
    """A run's result is written as a record when it is attacked; a current record (same
    attack settings, same trained run) is read without a checkpoint; a changed setting
    or a retrained run with another hash is attacked again; ``--report`` attacks
    nothing."""
    import json

    script = load_script("avmnist_adversarial")
    model, data, _ = _toy(n=6, seed=1)
    loads = []

    def load_trained(config, method, seed):
        loads.append((method, seed))
        return model

    trained = {"config_hash": "a" * 64, "numerics": "float32", "ledger_test_accuracy": 0.9}
    monkeypatch.setattr(script.avmnist_compress, "load_trained", load_trained)
    monkeypatch.setattr(script, "make_data", lambda config, normalize_audio: {"test": data})
    monkeypatch.setattr(script, "trained_run", lambda config, method, seed: dict(trained))
    settings = script.AdversarialConfig(
        methods=("concat",), seeds=(0, 1), image_linf=(0.02,), audio_linf=(0.1,),
        image_l2=(), audio_l2=(), steps=2, batch_size=4, records=str(tmp_path / "rec"))
    first = script.run(settings)
    assert loads == [("concat", 0), ("concat", 1)] and set(first) == {"concat/seed0",
                                                                    "concat/seed1"}
    record = json.loads((tmp_path / "rec" / "concat" / "seed1.json").read_text())
    assert record["result"] == first["concat/seed1"] and record["trained"] == trained
    assert record["settings"]["steps"] == 2 and "records" not in record["settings"]
    assert record["command"] == (  # this run alone, the settings that differ, no paths
        "python experiments/avmnist_adversarial.py --fusion concat --seeds 1 --image-linf "
        "0.02 --audio-linf 0.1 --image-l2 '' --audio-l2 '' --steps 2 --batch-size 4")
    assert script.parse_args(shlex.split(record["command"])[2:]) == dataclasses.replace(
        settings, seeds=(1,), records="results/avmnist_adversarial")
    assert record["machine"]["cpu"]

    loads.clear()
    assert script.run(settings) == first and loads == []  # read, not attacked
    report = script.run(dataclasses.replace(settings, report=True, seeds=(0, 2)))
    assert list(report) == ["concat/seed0"] and loads == []  # seed 2: no record
    script.run(dataclasses.replace(settings, steps=3))  # another setting: attacked again
    assert loads == [("concat", 0), ("concat", 1)]
    trained["config_hash"] = "b" * 64  # the run was retrained under another config
    loads.clear()
    script.run(dataclasses.replace(settings, steps=3, seeds=(1,)))
    assert loads == [("concat", 1)]
    with pytest.raises(ValueError, match="report"):
        script.AdversarialConfig(records=None, report=True)
