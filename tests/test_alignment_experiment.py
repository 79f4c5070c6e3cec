"""experiments/alignment.py on lepton_mm.harness: config, validation, run keys, and the
quick pipeline end to end (ledger records, a re-run that trains nothing, a byte-identical
report)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def alignment(load_script):
    return load_script("alignment")


def test_argparse_converts_to_a_typed_config(alignment):
    config, _ = alignment.parse_args(["--parts", "prompt_classifier,clip_loss", "--seeds",
                                      "0,1", "--workdir", "w", "--epochs", "3", "--snr-db",
                                      "0"])
    assert isinstance(config, alignment.AlignmentConfig)
    assert (config.seeds, config.epochs, config.workdir, config.snr_db) == ((0, 1), 3, "w",
                                                                          0.0)
    assert config.results == "results"
    assert alignment.resolve_parts(config) == ["prompt_classifier", "clip_loss"]
    assert alignment.resolve_parts(alignment.parse_args([])[0]) == list(alignment.PARTS)
    quick, _ = alignment.parse_args(["--quick"])
    assert quick.quick and quick.num_train == 6000 and quick.workdir.endswith("_quick")
    # quick records stay under the workdir, never in the committed ledger
    assert quick.results == str(Path(quick.workdir) / "results")
    assert alignment.parse_args(["--quick", "--workdir", "q"])[0].results == "q/results"
    with pytest.raises(Exception, match="frozen|cannot assign"):
        config.epochs = 1


def test_bad_settings_fail_before_compute(alignment, tmp_path, capsys):
    assert alignment.main(["--quick", "--parts", "clip_loss,nope", "--workdir",
                           str(tmp_path)]) == 2
    assert "Unrecognized part: 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unrecognized part: 'nope'.*prompt_classifier"):
        alignment.Alignment(alignment.quick_config(parts=("nope",))).keys()
    with pytest.raises(ValueError, match="seeds"):
        alignment.AlignmentConfig(seeds=(1, 1))
    with pytest.raises(ValueError, match="ks"):
        alignment.AlignmentConfig(ks=(0,))
    with pytest.raises(ValueError, match="exactly one"):
        alignment.AlignmentConfig(heldout_templates=("no slot",))
    assert not list(tmp_path.iterdir())


def test_each_part_is_keyed_by_the_settings_it_depends_on(alignment, tmp_path):
    from lepton_mm.experiment import RunKey

    config = alignment.quick_config(workdir=str(tmp_path))

    def workdirs(**changes):
        changed = dataclasses.replace(config, **changes)
        return {p: alignment.Alignment(changed).workdir(RunKey("alignment", p, 0))
                for p in alignment.PARTS}

    base = workdirs()
    assert all(path.is_absolute() and path.parent == tmp_path / p
               for p, path in base.items())
    # the projection size is a retrieval setting, the templates the prompt classifier's
    other = workdirs(embed_dim=32)
    assert [p for p in alignment.PARTS if other[p] != base[p]] == ["clip_loss",
                                                                    "sigmoid_loss"]
    other = workdirs(heldout_templates=("say {}",))
    assert [p for p in alignment.PARTS if other[p] != base[p]] == ["prompt_classifier"]
    assert all(a != b for a, b in zip(workdirs(epochs=2).values(), base.values(),
                                      strict=True))
    assert workdirs(progress=True, seeds=(0, 1)) == base  # no effect on a run's result
    experiment = alignment.Alignment(dataclasses.replace(config, num_train=500))
    command = experiment.command(RunKey("alignment", "clip_loss", 3))
    assert command == ("python experiments/alignment.py --quick --parts clip_loss --seeds 3 "
                       "--num-train=500 --force")
    # the hashed config of a part: its own settings and its name under "part"
    assert experiment.run_config("clip_loss")["part"] == "clip_loss"
    assert "method" not in experiment.run_config("clip_loss")


@pytest.mark.slow
@pytest.mark.optimized_xla
def test_quick_pipeline_learns_both_tasks(alignment, tmp_path, monkeypatch):
    # clip_loss and the prompt classifier on 1536 training pairs, two epochs of 48 steps,
    # at 0 dB (the benchmark's -15 dB needs far more steps before the audio side aligns),
    # with half-width LeNets (first widths 3) and a 16-d shared space: the steps are most
    # of the cost. Measured (data seed 0): R@1 0.26-0.35 against chance 0.10 and
    # untrained 0.11-0.14; prompt accuracy 0.61 against untrained 0.12. sigmoid_loss
    # trains through the same code as clip_loss (only the loss differs, and
    # tests/test_alignment_losses.py checks it against a reference), so it is left out:
    # a third less of this test's cost (~190 s of CPU time with all three parts).
    parts = ("clip_loss", "prompt_classifier")
    config = alignment.quick_config(
        parts=parts, workdir=str(tmp_path), num_train=1536, num_val=64, num_test=384,
        snr_db=0.0, batch_size=32, epochs=2, learning_rate=3e-3, image_channels=3, audio_channels=3,
        embed_dim=16, progress=False)
    result = alignment.Alignment(config).run()
    summary = result["methods"]

    assert list(summary) == list(parts) and result["complete"]
    s = summary["clip_loss"]
    assert s["test_size"] == 384 and s["epochs"] == 2
    for direction in ("image_to_audio", "audio_to_image"):
        chance = s["chance"][direction]
        trained = {k: v["mean"] for k, v in s["trained"][direction].items()}
        untrained = {k: v["mean"] for k, v in s["untrained"][direction].items()}
        assert set(trained) == {"recall@1", "recall@5"}
        assert chance["recall@1"] == pytest.approx(0.1, abs=0.01)
        assert trained["recall@1"] > chance["recall@1"] + 0.1, direction
        assert trained["recall@1"] > untrained["recall@1"] + 0.1, direction
        assert trained["recall@5"] >= trained["recall@1"]
    prompt = summary["prompt_classifier"]
    prompts = [*config.train_templates, *config.heldout_templates, alignment.ENSEMBLE]
    assert list(prompt["trained"]) == prompts
    assert prompt["heldout_templates"] == list(config.heldout_templates)
    assert prompt["chance"]["uniform"] == 0.1
    headline = prompt["trained"]["the spoken digit {}"]["mean"]
    assert headline > 0.25 and headline > prompt["untrained"]["the spoken digit {}"]["mean"] + 0.1
    assert prompt["trained"][alignment.ENSEMBLE]["mean"] > 0.25

    # One ledger record per run, under the workdir (quick mode), with the headline
    # numbers the docstring promises.
    records = {p: json.loads((tmp_path / "results" / "alignment" / p / "seed0.json")
                             .read_text()) for p in parts}
    for part, record in records.items():
        assert record["config"] == json.loads(json.dumps(
            alignment.Alignment(config).run_config(part)))
        assert record["config"]["num_train"] == 1536 and record["params"] > 0
    retrieval_keys = {"test_accuracy", "val_accuracy", "val_loss", "test_size", "trained",
                      "untrained", "chance", "history", "epochs", "best_epoch"}
    assert set(records["clip_loss"]["metrics"]) == retrieval_keys
    assert [set(h) for h in records["clip_loss"]["metrics"]["history"]] == [
        {"epoch", "train_loss", "val_loss"}] * 2
    metrics = records["prompt_classifier"]["metrics"]
    assert set(metrics) == {"test_accuracy", "val_accuracy", "test_size", "trained",
                            "untrained", "chance", "learned_scale", "heldout_templates",
                            "history", "epochs", "best_epoch"}
    assert [set(h) for h in metrics["history"]] == [{"epoch", "train_loss", "val_accuracy"}] * 2
    assert metrics["learned_scale"] > 0
    r1 = {d: records["clip_loss"]["metrics"]["trained"][d]["recall@1"]
          for d in ("image_to_audio", "audio_to_image")}
    assert records["clip_loss"]["metrics"]["test_accuracy"] == pytest.approx(
        (r1["image_to_audio"] + r1["audio_to_image"]) / 2)
    assert records["prompt_classifier"]["metrics"]["test_accuracy"] == headline
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("2 of 2 runs have a current record.")
    assert "image→audio R@1" in table and "| **clip_loss** |" in table
    assert '"the spoken digit {}"' in table and "*(held out)*" in table
    assert "prompt classifier" in table

    # Re-running finds every record current: no data, no training, the same report,
    # byte for byte; a report elsewhere reads the same records.
    stored = [(p, p.read_bytes()) for p in sorted(tmp_path.glob("results/**/*.json"))]
    report = [(tmp_path / n).read_bytes() for n in ("results.json", "results.md")]
    monkeypatch.setattr(alignment, "make_data", lambda config: pytest.fail("recomputed"))
    assert alignment.Alignment(config).run() == result
    assert [(p, p.read_bytes()) for p in sorted(tmp_path.glob("results/**/*.json"))] == stored
    assert [(tmp_path / n).read_bytes() for n in ("results.json", "results.md")] == report
    assert alignment.main(["--quick", "--parts", ",".join(parts), "--workdir", str(tmp_path),
                           "--num-train", "1536",
                           "--num-val", "64", "--num-test", "384", "--snr-db", "0",
                           "--batch-size", "32", "--epochs", "2", "--image-channels", "3",
                           "--audio-channels", "3", "--embed-dim", "16", "--report", "--out",
                           str(tmp_path / "report")]) == 0
    assert [(tmp_path / "report" / n).read_bytes()
            for n in ("results.json", "results.md")] == report
    assert np.isfinite(prompt["num_params"])
