"""experiments/avmnist.py: config, validation, robustness, and the quick mode end to end."""

import dataclasses
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_argparse_converts_to_a_typed_config(avmnist):
    config, args = avmnist.parse_args(["--fusion", "all", "--seeds", "0,1,2", "--workdir",
                                       "w", "--data-seed", "3", "--epochs", "2"])
    assert isinstance(config, avmnist.AVMNISTConfig)
    assert (config.seeds, config.data_seed, config.epochs, config.workdir) == (
        (0, 1, 2), 3, 2, "w")
    assert config.results == "results" and not args.report and args.shard is None
    assert config.snr_sweep == (20, 10, 0, -5, -10, -15, -20) and config.robustness
    assert config.image_noise_sweep[0] == 0.0 and config.modality_dropout == 0.0
    from lepton_mm.fusion import FUSIONS

    assert avmnist.resolve_methods(config) == ["image_only", "audio_only", *sorted(FUSIONS)]
    quick, _ = avmnist.parse_args(["--quick", "--seed", "4"])
    assert quick.quick and quick.seeds == (4,) and quick.num_train == 12000
    assert quick.snr_db == -15.0 and quick.progress is True  # the benchmark; bars shown
    assert quick.results == "runs/avmnist_quick/results"  # quick records stay local
    from lepton_mm.recipes.avmnist import QUICK_METHODS

    assert avmnist.resolve_methods(quick) == list(QUICK_METHODS)
    assert avmnist.parse_args(["--quick", "--no-progress"])[0].progress is False
    with pytest.raises(Exception, match="frozen|cannot assign"):
        config.epochs = 1
    sweeps, _ = avmnist.parse_args(["--snr-sweep=10,-20", "--image-noise", "0,1",
                                    "--no-robustness"])
    assert (sweeps.snr_sweep, sweeps.image_noise_sweep, sweeps.robustness) == (
        (10.0, -20.0), (0.0, 1.0), False)
    with pytest.raises(SystemExit):
        avmnist.parse_args(["--shard", "2/2"])


def test_every_run_has_its_own_config_and_command(avmnist):
    config, _ = avmnist.parse_args(["--fusion", "image_only,concat,gated",
                                    "--modality-dropout", "0.3", "--epochs", "3"])
    assert avmnist.resolve_methods(config) == [
        "image_only", "concat", "concat+mdrop", "gated", "gated+mdrop"]
    assert avmnist.split_method("gated+mdrop") == ("gated", "mdrop")
    assert avmnist.split_method("gated") == ("gated", None)
    plain = avmnist.AVMNIST(config).run_config("concat")
    mdrop = avmnist.AVMNIST(config).run_config("concat+mdrop")
    assert "modality_dropout" not in plain
    assert mdrop == {**plain, "method": "concat+mdrop", "modality_dropout": 0.3}
    # What is not training (the method list, seeds, paths) does not enter a run's config.
    other = avmnist.AVMNISTConfig(methods=("concat",), seeds=(5,), epochs=3, workdir="x")
    assert avmnist.AVMNIST(other).run_config("concat") == plain
    # Everything that is does, the robustness protocol included.
    for change in ({"epochs": 4}, {"snr_db": 0.0}, {"image_noise_sweep": (0.0, 1.0)}):
        changed = dataclasses.replace(other, **change)
        assert avmnist.AVMNIST(changed).run_config("concat") != plain, change
    # The stored command trains exactly this run again (parsed back: the same config).
    from lepton_mm.experiment import RunKey

    command = avmnist.AVMNIST(config).command(RunKey("avmnist", "gated+mdrop", 2))
    assert command.startswith("python experiments/avmnist.py ") and "--force" in command
    again, args = avmnist.parse_args(command.split()[2:])
    assert args.force and again.seeds == (2,)
    assert avmnist.AVMNIST(again).run_config("gated+mdrop") == avmnist.AVMNIST(
        config).run_config("gated+mdrop")
    # A changed protocol is written out too (and parses back).
    sweeps = dataclasses.replace(config, snr_sweep=(10.0, -20.0), learning_rate=0.05)
    command = avmnist.AVMNIST(sweeps).command(RunKey("avmnist", "concat", 0, 3))
    again, _ = avmnist.parse_args(command.split()[2:])
    assert "--data-seed 3" in command and again.data_seed == 3
    assert avmnist.AVMNIST(again).run_config("concat") == avmnist.AVMNIST(
        dataclasses.replace(sweeps, data_seed=3)).run_config("concat")
    quiet = avmnist.AVMNIST(dataclasses.replace(config, robustness=False))
    assert "--no-robustness" in quiet.command(RunKey("avmnist", "concat", 0))



def assert_commands_round_trip(avmnist, experiment, methods, seed=1):
    """Each run's stored command parses back to a config that asks for the run and gives
    it the same run config, hence the same config hash (the same record)."""
    from lepton_mm.experiment import RunKey

    for method in methods:
        key = RunKey("avmnist", method, seed)
        command = experiment.command(key)
        again, _ = avmnist.parse_args(command.split()[2:])
        assert method in avmnist.resolve_methods(again), command
        assert avmnist.AVMNIST(again).run_config(method) == experiment.run_config(method)
        assert avmnist.AVMNIST(again).config_hash(key) == experiment.config_hash(key)

def test_balance_strategies_are_runs_of_their_own(avmnist):
    from lepton_mm.experiment import RunKey

    config, _ = avmnist.parse_args(["--fusion", "audio_only,concat", "--balance",
                                    "ogm_ge,gblend,mmpareto", "--ogm-alpha", "0.3",
                                    "--gblend-pilot", "2,3"])
    assert avmnist.resolve_methods(config) == [
        "audio_only", "concat", "concat+ogm_ge", "concat+gblend", "concat+mmpareto"]
    plain = avmnist.AVMNIST(avmnist.AVMNISTConfig()).run_config("concat")
    # Adding strategies leaves the plain runs' configs (and so their records) alone.
    assert avmnist.AVMNIST(config).run_config("concat") == plain
    assert avmnist.AVMNIST(config).run_config("concat+ogm_ge") == {
        **plain, "method": "concat+ogm_ge", "strategy": {"name": "ogm_ge", "alpha": 0.3}}
    assert avmnist.AVMNIST(config).run_config("concat+gblend")["strategy"] == {
        "name": "gblend", "pilot_epochs": [2, 3], "pilot_train_examples": 5000}
    assert_commands_round_trip(avmnist, avmnist.AVMNIST(config),
                               ("concat+ogm_ge", "concat+gblend", "concat+mmpareto"))
    experiment = avmnist.AVMNIST(config)
    assert experiment.strategy(RunKey("avmnist", "concat", 0), None, None) == (None, {})
    ogm, _ = experiment.strategy(RunKey("avmnist", "concat+ogm_ge", 0), None, None)
    assert ogm.alpha == 0.3 and ogm.noise
    pareto, _ = experiment.strategy(RunKey("avmnist", "concat+mmpareto", 0), None, None)
    assert pareto.task.num_classes == 10 and pareto.gamma == 1.0
    pmr_config, _ = avmnist.parse_args(["--fusion", "concat", "--balance", "pmr"])
    pmr_run = avmnist.AVMNIST(pmr_config)
    assert pmr_run.run_config("concat+pmr")["strategy"] == {
        "name": "pmr", "alpha": 1.0, "mu": 0.0, "momentum": 0.9}
    pmr, _ = pmr_run.strategy(RunKey("avmnist", "concat+pmr", 0), None, None)
    assert (pmr.alpha, pmr.mu, pmr.momentum) == (1.0, 0.0, 0.9)
    with pytest.raises(ValueError, match=r"balance: unknown strategies \['agm'\]"):
        avmnist.AVMNISTConfig(balance=("agm",))
    with pytest.raises(ValueError, match="ogm_alpha"):
        avmnist.AVMNISTConfig(ogm_alpha=0.0)
    for bad in ({"learning_rate": -1.0}, {"momentum": 1.0}, {"weight_decay": -1e-4}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            avmnist.AVMNISTConfig(**bad)
    with pytest.raises(ValueError, match="gblend_pilot"):
        avmnist.AVMNISTConfig(gblend_pilot=(2, 2))


def test_audio_variants_are_runs_of_their_own(avmnist):
    from lepton_mm.experiment import RunKey

    config, _ = avmnist.parse_args(["--fusion", "image_only,audio_only,concat",
                                    "--train-snr-db=-20,20", "--utterance-norm"])
    variants = ["+snr_range", "+utt_norm", "+snr_range+utt_norm"]
    assert avmnist.resolve_methods(config) == [
        "image_only", *(m + v for m in ("audio_only", "concat") for v in ["", *variants])]
    only_snr = dataclasses.replace(config, utterance_norm=False)
    assert avmnist.resolve_methods(only_snr) == [
        "image_only", "audio_only", "audio_only+snr_range", "concat", "concat+snr_range"]
    experiment = avmnist.AVMNIST(config)
    for method in ("image_only", "audio_only", "concat"):  # the plain runs are untouched
        plain = avmnist.AVMNIST(avmnist.AVMNISTConfig()).run_config(method)
        assert experiment.run_config(method) == plain
    snr = experiment.run_config("concat+snr_range")
    assert snr == {**plain, "method": "concat+snr_range", "train_snr_db": [-20.0, 20.0],
                   "robustness": {**plain["robustness"], "train_snr_db": [-20.0, 20.0]}}
    both = experiment.run_config("concat+snr_range+utt_norm")
    assert both == {**snr, "method": "concat+snr_range+utt_norm",
                    "normalize_audio": "utterance",
                    "robustness": {**snr["robustness"], "normalize_audio": "utterance"}}
    assert_commands_round_trip(avmnist, experiment, avmnist.resolve_methods(config))
    assert "--train-snr-db=-20,20 --utterance-norm" in experiment.command(
        RunKey("avmnist", "audio_only+snr_range+utt_norm", 0))
    assert avmnist.variant_tags("concat+snr_range+utt_norm") == ("snr_range", "utt_norm")
    assert avmnist.variant_tags("concat") == ()


def test_recorded_commands_still_reproduce_their_records(avmnist):
    """Every current record's command parses back to its config hash (options added
    since, such as the audio variants, leave the plain runs' hashes alone)."""
    from lepton_mm.experiment import NUMERICS, RunKey

    records = [json.loads(p.read_text())
               for p in sorted((ROOT / "results" / "avmnist").glob("*/seed*.json"))]
    ours = [r for r in records if r["command"].startswith("python experiments/avmnist.py ")
            and r["numerics"] == NUMERICS]
    assert len(ours) >= 39
    for record in ours:
        config, _ = avmnist.parse_args(record["command"].split()[2:])
        experiment = avmnist.AVMNIST(config)
        key = RunKey("avmnist", record["method"], record["seed"], record["data_seed"])
        assert key in experiment.keys(), record["command"]
        assert experiment.config_hash(key) == record["config_hash"], record["command"]
        assert experiment.command(key) == record["command"]


def test_bad_names_fail_before_compute(avmnist, tmp_path, capsys):
    assert avmnist.main(["--quick", "--fusion", "concat,nope", "--workdir",
                         str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Unrecognized method: 'nope'" in err[0] and "concat" in err[0]
    with pytest.raises(ValueError, match="seeds"):
        avmnist.AVMNISTConfig(seeds=(1, 1))
    # A value the config rejects, given on the command line: one line, exit 2.
    for argv, message in ((["--seeds", "1,1"], "seeds: expected distinct seeds"),
                          (["--balance", "nope"], "balance: unknown strategies ['nope']"),
                          (["--quick", "--modality-dropout", "1.5"], "modality_dropout"),
                          (["--gblend-pilot", "1,x"], "argument --gblend-pilot: expected "
                                                      "comma-separated integers, got '1,x'")):
        with pytest.raises(SystemExit) as exit_info:
            avmnist.parse_args(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ": error: " in err[0] and message in err[0]
    with pytest.raises(ValueError, match="modality_dropout"):
        avmnist.AVMNISTConfig(modality_dropout=1.0)
    with pytest.raises(ValueError, match="snr_sweep.*decreasing"):
        avmnist.AVMNISTConfig(snr_sweep=(-20.0, 0.0))
    with pytest.raises(ValueError, match="image_noise_sweep"):
        avmnist.AVMNISTConfig(image_noise_sweep=(0.5,))
    assert not list(tmp_path.iterdir())


def _check_summary(results, methods, sweeps):
    assert set(results) == set(methods)
    for method, r in results.items():
        acc = r["test_accuracy"]
        assert set(acc) == {"mean", "std", "per_seed"}
        assert set(acc["per_seed"]) == {"0"} and acc["std"] is None
        assert acc["mean"] == acc["per_seed"]["0"]
        assert r["num_params"] > 0 and r["epoch_time_s"] > 0 and r["peak_rss_mb"] > 0
        fused = method not in ("image_only", "audio_only")
        assert (r["audio_absent"] is not None) == fused
        assert (r["image_absent"] is not None) == fused
        assert (r["audio_snr"] is not None) == (method != "image_only")
        assert (r["image_noise"] is not None) == (method != "audio_only")
        for sweep, levels in sweeps.items():
            if r[sweep] is not None:
                assert r[sweep]["levels"] == list(levels)
                assert len(r[sweep]["mean"]) == len(levels)
                assert r[sweep]["effective_robustness"] is not None
    for sweep in sweeps:  # the reference (concat) scores 0 against itself
        assert results["concat"][sweep]["effective_robustness"]["mean"] == pytest.approx(0)


@pytest.mark.slow
@pytest.mark.optimized_xla
def test_runs_become_records_and_the_report_reads_them(avmnist, load_script, tmp_path):
    """Records are written per run, a re-run trains nothing, the report is
    byte-identical, a changed protocol makes records stale, shards partition."""
    from lepton_mm import experiment as ledger

    sweeps = {"audio_snr": (0.0, -15.0), "image_noise": (0.0, 0.5)}
    methods = ("image_only", "audio_only", "concat")
    config = avmnist.quick_config(
        methods=methods, num_train=1600, num_val=200, num_test=300,
        workdir=str(tmp_path / "runs"), results=str(tmp_path / "results"), progress=False,
        snr_sweep=sweeps["audio_snr"], image_noise_sweep=sweeps["image_noise"])
    result = avmnist.AVMNIST(config).run()
    assert result["complete"] and result["missing"] == [] and result["stale"] == []
    _check_summary(result["methods"], methods, sweeps)
    for method in methods:
        record = ledger.read_record(tmp_path / "results" / "avmnist" / method / "seed0.json")
        assert set(ledger.REQUIRED_KEYS) <= set(record)
        assert record["numerics"] == ledger.NUMERICS
        assert record["config_hash"] == ledger.config_hash(
            avmnist.AVMNIST(config).run_config(method))
        rob, metrics = record["robustness"], record["metrics"]
        # Test accuracy is scored once: the robustness pass's clean condition.
        assert metrics["test_accuracy"] == rob["both"]
        if method != "image_only":  # the sweep's -15 dB point is the test split itself
            assert rob["audio_snr"][1] == rob["both"]
        assert 0 <= metrics["val_accuracy"] <= 1 and metrics["best_epoch"] == 1
    # Training works at all (chance is 0.1): a behaviour check, not a ranking.
    assert result["methods"]["image_only"]["test_accuracy"]["mean"] > 0.3
    table = (tmp_path / "runs" / "results.md").read_text()
    assert table.startswith("3 of 3 runs have a current record.")
    assert "| concat |" in table and "**Audio SNR sweep**" in table
    for name in ("audio_snr_sweep.png", "image_noise_sweep.png"):
        assert (tmp_path / "runs" / name).read_bytes()[:4] == b"\x89PNG"

    # The noise-level check reads the same checkpoints: at sigma 0 it is the record's
    # validation accuracy (another evaluator over the best checkpoint).
    curves = load_script("avmnist_noise_levels").validate_image_noise(config)
    assert sorted(curves) == ["concat/seed0", "image_only/seed0"]
    for name, curve in curves.items():
        record = ledger.read_record(tmp_path / "results" / "avmnist" / name.replace(
            "/seed0", "") / "seed0.json")
        assert curve[0.0] == pytest.approx(record["metrics"]["val_accuracy"], abs=1e-6)
        assert curve[1.5] < curve[0.0]

    # Re-running finds every record current: no training (no log is touched).
    logs = sorted((tmp_path / "runs").glob("*/*/log.jsonl"))
    assert len(logs) == 3
    before = [(p.stat().st_mtime_ns, p.read_bytes()) for p in logs]
    assert avmnist.AVMNIST(config).run() == result
    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in logs] == before
    # --report trains nothing and writes byte-identical files from the same records.
    assert avmnist.main(["--quick", "--fusion", ",".join(methods), "--report",
                         "--num-train", "1600", "--num-val", "200", "--num-test", "300",
                         "--snr-sweep=0,-15", "--image-noise", "0,0.5",
                         "--results", str(tmp_path / "results"),
                         "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "results.md").read_bytes() == table.encode()
    assert json.loads((tmp_path / "report" / "results.json").read_text()) == result

    # Another protocol: the records are stale, listed, and never mixed into a table.
    other = dataclasses.replace(config, image_noise_sweep=(0.0, 1.0))
    stale = avmnist.AVMNIST(other).report(tmp_path / "other")
    assert not stale["complete"] and stale["methods"] == {}
    assert sorted(stale["stale"]) == sorted(f"avmnist/{m}/seed0" for m in methods)
    assert sorted(stale["missing"]) == sorted(stale["stale"])
    # Shards split what is left to do.
    keys = avmnist.AVMNIST(other).keys()
    assert ledger.shard(keys, "0/2") + ledger.shard(keys, "1/2") != keys
    assert sorted(ledger.shard(keys, "0/2") + ledger.shard(keys, "1/2"),
                  key=keys.index) == keys


@pytest.mark.slow
def test_modality_dropout_trains_a_separate_run(avmnist, tmp_path):
    """``--modality-dropout`` adds a ``+mdrop`` run beside the plain one, and its
    train() trains with that rate (the plain run is the records test's)."""
    from lepton_mm.experiment import RunKey
    from lepton_mm.training import Checkpointer

    config = avmnist.quick_config(
        methods=("concat",), num_train=64, num_val=32, num_test=32, epochs=1,
        modality_dropout=0.5, workdir=str(tmp_path), results=str(tmp_path / "results"),
        progress=False, snr_sweep=(0.0, -15.0), image_noise_sweep=(0.0, 1.0))
    experiment = avmnist.AVMNIST(config)
    assert [k.method for k in experiment.keys()] == ["concat", "concat+mdrop"]
    assert experiment.run_config("concat").get("modality_dropout", 0.0) == 0.0
    assert experiment.run_config("concat+mdrop")["modality_dropout"] == 0.5
    key = RunKey("avmnist", "concat+mdrop", 0)
    fields = experiment.train(key, experiment.prepare([key]), tmp_path / "mdrop")
    assert 0.0 <= fields["metrics"]["test_accuracy"] <= 1.0
    meta = Checkpointer(tmp_path / "mdrop", read_only=True).read_meta()
    assert meta["config"]["modality_dropout"] == 0.5


@pytest.mark.slow
def test_gradient_blending_run_weights_its_heads_from_a_pilot(avmnist, tmp_path):
    """The experiment's train() of a +gblend run: the pilot, its head losses, the
    weights, the blended run (the harness around it is the one every run uses; the
    strategies themselves: tests/test_balance.py; +ogm_ge / +mmpareto only build theirs:
    test_balance_strategies_are_runs_of_their_own)."""
    from lepton_mm.experiment import RunKey
    from lepton_mm.training import Checkpointer, read_log

    config = avmnist.quick_config(
        methods=("concat",), num_train=320, num_val=64, num_test=32, epochs=1,
        balance=("gblend",), gblend_train_examples=64, robustness=False,
        workdir=str(tmp_path), results=str(tmp_path / "results"), progress=False)
    experiment = avmnist.AVMNIST(config)
    key = RunKey("avmnist", "concat+gblend", 0)
    fields = experiment.train(key, experiment.prepare([key]), tmp_path / "gblend")
    weights = fields["extra"]["gblend_weights"]
    assert set(weights) == {"fused", "audio", "image"}
    assert sum(weights.values()) == pytest.approx(2.0)  # the paper's normalisation
    losses = fields["extra"]["gblend_head_losses"]
    assert set(losses) == {"epoch 1", "epoch 2"}
    assert set(losses["epoch 2"]["val"]) == set(losses["epoch 1"]["train"]) == set(weights)
    pilot = read_log(tmp_path / "gblend" / "gblend_pilot" / "log.jsonl")
    assert max(r["epoch"] for r in pilot if r["kind"] == "epoch") == 2
    assert "GradientBlending(weights=" in Checkpointer(
        tmp_path / "gblend", read_only=True).read_meta()["config"]["strategy"]


def test_recurrent_audio_encoders_are_runs_of_their_own(avmnist, capsys):
    from lepton_mm.experiment import RunKey
    from lepton_mm.recipes.avmnist import AUDIO_ENCODERS, audio_encoder_name

    config, _ = avmnist.parse_args(["--fusion", "image_only,audio_only,concat",
                                    "--audio-encoder", "gru,lstm,lenet,bigru,gru"])
    assert config.audio_encoder == ("gru", "lstm", "bigru")  # lenet: the plain runs
    assert avmnist.resolve_methods(config) == [
        "image_only", *(m + v for m in ("audio_only", "concat")
                        for v in ("", "+gru", "+lstm", "+bigru"))]
    assert avmnist.resolve_methods(avmnist.parse_args(
        ["--fusion", "audio_only", "--audio-encoder", "lenet"])[0]) == ["audio_only"]
    experiment = avmnist.AVMNIST(config)
    for method in ("image_only", "audio_only", "concat"):  # the plain runs are untouched
        plain = avmnist.AVMNIST(avmnist.AVMNISTConfig()).run_config(method)
        assert experiment.run_config(method) == plain
    assert experiment.run_config("concat+bigru") == {
        **plain, "method": "concat+bigru", "audio_encoder": {
            "name": "bigru", "cell": "gru", "bidirectional": True, "hidden_size": 162,
            "num_layers": 1, "pooled": "masked mean"}}
    keys = [RunKey("avmnist", m, 0) for m in avmnist.resolve_methods(config)]
    assert len({experiment.config_hash(k) for k in keys}) == len(keys)
    assert_commands_round_trip(avmnist, experiment, avmnist.resolve_methods(config), 0)
    assert experiment.command(RunKey("avmnist", "audio_only+lstm", 2)) == (
        "python experiments/avmnist.py --fusion audio_only --audio-encoder lstm "
        "--seeds 2 --force")
    assert [audio_encoder_name(m) for m in ("concat", "concat+gru", "audio_only+bilstm",
                                            "concat+snr_range")] == [
        "lenet", "gru", "bilstm", "lenet"]
    assert set(AUDIO_ENCODERS) == {"gru", "lstm", "bigru", "bilstm"}
    with pytest.raises(SystemExit) as exit_info:
        avmnist.parse_args(["--audio-encoder", "gru,cnn"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "audio_encoder: unknown encoders ['cnn']" in err[0]


def test_recurrent_audio_models_match_the_lenet_budget_and_ignore_padding():
    """Each recurrent audio encoder has about the audio LeNet's parameters, and its
    model's logits do not depend on what the padded frames hold."""
    import jax
    import numpy as np
    from flax import nnx

    from lepton_mm.recipes.avmnist import AUDIO_ENCODERS, AVMNISTConfig, build_model

    def count(module):
        return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))

    @nnx.jit
    def forward(model, batch):
        return model(batch)

    config = AVMNISTConfig()
    lenet = count(build_model(config, "audio_only", nnx.Rngs(0)).encoders["audio"])
    assert lenet == 221_874
    rng = np.random.default_rng(0)
    lengths = np.array([126, 40, 1])
    mask = np.arange(126)[None] < lengths[:, None]
    audio = rng.normal(size=(3, 126, 64)).astype(np.float32)
    noisy = np.where(mask[..., None], audio, 1e4 * rng.normal(size=audio.shape)
                     ).astype(np.float32)
    image = rng.normal(size=(3, 28, 28, 1)).astype(np.float32)
    totals = {}
    for method in [f"audio_only+{e}" for e in AUDIO_ENCODERS] + ["concat+bigru"]:
        model = build_model(config, method, nnx.Rngs(0))
        model.eval()
        encoder = model.encoders["audio"]
        assert abs(count(encoder) - lenet) < 0.02 * lenet, method
        totals[method] = count(model)
        if method not in ("audio_only+lstm", "concat+bigru"):  # both cells, both ways
            continue
        batch = {"audio": (audio, mask)} | ({"image": image} if "concat" in method else {})
        out = np.asarray(forward(model, batch))
        assert out.shape == (3, 10) and np.isfinite(out).all()
        np.testing.assert_array_equal(
            out, np.asarray(forward(model, {**batch, "audio": (noisy, mask)})))
    assert totals == {"audio_only+gru": 244_710, "audio_only+lstm": 241_014,
                      "audio_only+bigru": 254_154, "audio_only+bilstm": 246_998,
                      "concat+bigru": totals["concat+bigru"]}


def test_bf16_training_is_a_run_of_its_own(avmnist, capsys):
    from lepton_mm.experiment import RunKey
    from lepton_mm.recipes.avmnist import training_dtype

    config, _ = avmnist.parse_args(["--fusion", "image_only,concat", "--compute-dtype",
                                    "bfloat16"])
    assert avmnist.resolve_methods(config) == [
        "image_only", "image_only+bf16", "concat", "concat+bf16"]
    assert avmnist.parse_args([])[0].compute_dtype == "float32"
    assert avmnist.split_method("concat+bf16") == ("concat", "bf16")
    assert [training_dtype(m) for m in ("concat", "concat+bf16", "concat+mdrop")] == [
        "float32", "bfloat16", "float32"]
    experiment = avmnist.AVMNIST(config)
    for method in ("image_only", "concat"):  # the plain runs are untouched
        plain = avmnist.AVMNIST(avmnist.AVMNISTConfig()).run_config(method)
        assert experiment.run_config(method) == plain
        assert "--compute-dtype" not in experiment.command(RunKey("avmnist", method, 0))
    assert experiment.run_config("concat+bf16") == {
        **plain, "method": "concat+bf16", "compute_dtype": "bfloat16",
        "robustness": {**plain["robustness"],
                       "compute_dtype": {"train": "bfloat16", "test": "float32"}}}
    keys = [RunKey("avmnist", m, 1) for m in avmnist.resolve_methods(config)]
    assert len({experiment.config_hash(k) for k in keys}) == len(keys)
    assert_commands_round_trip(avmnist, experiment, avmnist.resolve_methods(config))
    assert experiment.command(keys[-1]) == (
        "python experiments/avmnist.py --fusion concat --compute-dtype bfloat16 --seeds 1 "
        "--force")
    # The follow-up scripts find a +bf16 run's checkpoints from a default config.
    assert avmnist.AVMNIST(avmnist.AVMNISTConfig()).workdir(keys[-1]) == \
        experiment.workdir(keys[-1])
    with pytest.raises(SystemExit) as exit_info:
        avmnist.parse_args(["--compute-dtype", "float16"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("compute_dtype: expected one of ['float32', 'bfloat16']"
                              in err[0]) and "got 'float16'" in err[0]


def test_bf16_run_trains_in_mixed_precision_and_is_scored_in_float32(avmnist, tmp_path,
                                                                       monkeypatch):
    """The experiment's train() of a tiny +bf16 run beside its float32 run: the
    checkpoint names the dtype, both end with finite float32 parameters, which differ.
    The wiring, not the model: synthetic data of AV-MNIST's shapes and a one-block
    image LeNet (the full one's train step takes ~10 s per dtype to compile on a busy
    CPU); mixed precision itself is tests/test_mixed_precision.py's."""
    import jax
    import numpy as np
    from flax import nnx

    from lepton_mm.encoders import ImageCNN
    from lepton_mm.experiment import RunKey
    from lepton_mm.recipes import avmnist as recipe
    from lepton_mm.training import Checkpointer, load_model

    monkeypatch.setattr(recipe, "lenet_encoders", lambda config, modalities, *, rngs: {
        "image": ImageCNN.lenet(1, channels=4, additional_layers=0, rngs=rngs)})
    rng = np.random.default_rng(0)
    data = {name: {"image": rng.random((n, 28, 28, 1), np.float32),
                   "audio": (rng.normal(size=(n, 126, 64)).astype(np.float32),
                             np.ones((n, 126), bool)),
                   "label": rng.integers(0, 10, n).astype(np.int32)}
            for name, n in (("train", 32), ("val", 16), ("test", 16))}
    config = avmnist.quick_config(
        methods=("image_only",), compute_dtype="bfloat16", robustness=False,
        workdir=str(tmp_path), results=str(tmp_path / "results"), progress=False)
    experiment = avmnist.AVMNIST(config)
    params = {}
    for method, dtype in (("image_only", None), ("image_only+bf16", "bfloat16")):
        key = RunKey("avmnist", method, 0)
        fields = experiment.train(key, {True: {**data, "audio_stats": None,
                                               "audio_norm": None}}, tmp_path / method)
        assert 0 <= fields["metrics"]["test_accuracy"] <= 1
        meta = Checkpointer(tmp_path / method, read_only=True).read_meta()["config"]
        assert meta["compute_dtype"] == dtype
        assert meta["user"]["hash"] == experiment.config_hash(key)
        model = load_model(tmp_path / method,
                           lambda m=method: recipe.build_model(config, m, nnx.Rngs(0)))
        params[method] = jax.tree.leaves(nnx.state(model, nnx.Param))
        assert all(p.dtype == np.float32 and np.isfinite(p).all()
                   for p in params[method]), method
    assert any(not np.array_equal(a, b) for a, b in zip(*params.values(), strict=True))
