"""benchmarks/peers/multibench_avmnist.py: MultiBench's AV-MNIST recipe in PyTorch."""

import copy
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SIZES = {"num_train": 200, "num_val": 80, "num_test": 80}


@pytest.fixture(scope="module")
def peer():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from peers import multibench_avmnist
    finally:
        sys.path.remove(str(BENCHMARKS))
    return multibench_avmnist


@pytest.fixture(scope="module")
def data(peer):
    return peer.make_data(data_seed=0, **SIZES)


def test_importing_the_peer_starts_no_jax():
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import peers.multibench_avmnist; "
            "print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False"


def test_architecture_matches_multibench(peer):
    def lenet(channels, extra):  # conv weights (5x5 first, 3x3 after) + batch-norm scale/bias
        widths = [channels * 2**i for i in range(extra + 1)]
        convs = 25 * widths[0] + sum(9 * a * b for a, b in itertools.pairwise(widths))
        return convs + 2 * sum(widths)

    def head(d):
        return d * 100 + 100 + 100 * 10 + 10

    assert (lenet(6, 3), lenet(6, 5)) == (13_938, 221_874)
    expected = {"image": lenet(6, 3) + head(48), "audio": lenet(6, 5) + head(192),
                "concat": lenet(6, 3) + lenet(6, 5) + head(240)}
    assert expected == {"image": 19_848, "audio": 242_184, "concat": 260_922}
    models = {m: peer.LateFusionClassifier(m) for m in peer.METHODS}
    assert {m: peer.param_count(model) for m, model in models.items()} == expected
    assert models["concat"].head[0].in_features == 240

    concat = models["concat"].eval()
    images, log_mel = torch.zeros(2, 1, 28, 28), torch.zeros(2, 1, 126, 64)
    assert concat.image(images).shape == (2, peer.IMAGE_FEATURES) == (2, 48)
    assert concat.audio(log_mel).shape == (2, peer.AUDIO_FEATURES) == (2, 192)
    assert concat.image.feature_map(images).shape == (2, 48, 1, 1)
    # Ceil pooling (our encoder's) leaves 2 time cells to average; MultiBench's floor 1.
    assert concat.audio.feature_map(log_mel).shape == (2, 192, 2, 1)
    floor = peer.LateFusionClassifier("audio", audio_pool="floor").audio
    assert floor.feature_map(log_mel).shape == (2, 192, 1, 1)
    assert concat(images, log_mel).shape == (2, 10)

    # MultiBench's kaiming_uniform_ (a=0): bound sqrt(6 / fan_in), where PyTorch's
    # default conv init stops at 1 / sqrt(fan_in).
    conv = concat.audio.convs[-1]
    fan_in = conv.weight[0].numel()
    bound = np.sqrt(6 / fan_in)
    top = conv.weight.abs().max().item()
    assert 0.99 * bound < top <= bound and top > 2 / np.sqrt(fan_in)
    assert all(c.bias is None for c in [*concat.image.convs, *concat.audio.convs])


def test_encoders_compute_what_the_torch_twins_compute(peer, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import torch_models

    torch.manual_seed(0)
    ours = peer.LateFusionClassifier("concat")
    twins = {"image": torch_models.LeNetImage(1, 6, 3), "audio": torch_models.LeNetAudio(64, 6, 5)}
    for name, twin in twins.items():
        lenet = getattr(ours, name)
        for i, block in enumerate(twin.blocks):
            block[0].load_state_dict(lenet.convs[i].state_dict())
            block[1].load_state_dict(lenet.bns[i].state_dict())
        assert peer.param_count(twin) == peer.param_count(lenet)
    images, log_mel = torch.randn(3, 1, 28, 28), torch.randn(3, 126, 64)
    for train in (True, False):
        ours.train(train)
        for twin in twins.values():
            twin.train(train)
        np.testing.assert_allclose(ours.image(images).detach(),
                                   twins["image"](images).detach(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours.audio(log_mel[:, None]).detach(),
                                   twins["audio"](log_mel).detach(), rtol=1e-5, atol=1e-6)


def test_batches_zero_the_masked_frames_and_leave_the_data_alone(peer, data):
    split = data["val"]
    log_mel, mask = split["audio"]
    assert not mask.all() and mask.any(axis=1).all()
    before = log_mel.copy()
    tensors = peer._tensors(split, "concat")
    index = torch.tensor([3, 0, 7])
    image, audio, label = peer._batch(tensors, index)
    assert image.shape == (3, 1, 28, 28) and audio.shape == (3, 1, 126, 64)
    np.testing.assert_array_equal(image[:, 0].numpy(), split["image"][[3, 0, 7], ..., 0])
    expected = np.where(mask[[3, 0, 7]][..., None], log_mel[[3, 0, 7]], 0)
    np.testing.assert_array_equal(audio[:, 0].numpy(), expected)
    assert label.dtype == torch.int64 and label.tolist() == split["label"][[3, 0, 7]].tolist()
    np.testing.assert_array_equal(log_mel, before)  # the caller's arrays are untouched


def test_the_best_validation_epoch_is_kept_and_scored(peer, data, monkeypatch):
    real = peer._evaluate
    scripted = [0.3, 0.5, 0.5]  # best: epoch 2 (a tie keeps the earlier epoch)
    calls = []

    def evaluate(model, tensors, *, batch_size):
        calls.append(copy.deepcopy(model.state_dict()))
        accuracy, predicted = real(model, tensors, batch_size=batch_size)
        return (scripted[len(calls) - 1], predicted) if len(calls) <= 3 else (
            accuracy, predicted)

    monkeypatch.setattr(peer, "_evaluate", evaluate)
    out = peer.train_run("image", 0, data, epochs=3, num_threads=1)
    assert len(calls) == 4  # three validation passes, then the test split once
    assert [h["val_accuracy"] for h in out["history"]] == scripted
    assert out["best_epoch"] == 2 and out["val_accuracy"] == max(scripted)
    scored, epoch2, epoch3 = calls[3], calls[1], calls[2]
    for name, value in scored.items():
        torch.testing.assert_close(value, epoch2[name], rtol=0, atol=0)
    assert not torch.equal(scored["head.0.weight"], epoch3["head.0.weight"])
    # The test accuracy is that of the epoch-2 weights.
    model = peer.LateFusionClassifier("image")
    model.load_state_dict(epoch2)
    expected, _ = real(model, peer._tensors(data["test"], "image"), batch_size=40)
    assert out["test_accuracy"] == expected
    assert out["params"] == 19_848 and out["num_threads"] == 1


def test_a_seed_repeats_its_run_and_another_seed_does_not(peer, data):
    runs = [peer.train_run("image", s, data, epochs=1, num_threads=1) for s in (4, 4, 5)]
    assert runs[0]["history"][0]["train_loss"] == runs[1]["history"][0]["train_loss"]
    assert runs[0]["test_accuracy"] == runs[1]["test_accuracy"]
    assert runs[0]["history"][0]["train_loss"] != runs[2]["history"][0]["train_loss"]


def _args(peer, tmp_path, *extra):
    return peer.parse_args(["--results", str(tmp_path), *extra])


def test_the_cli_writes_a_record_once(peer, data, tmp_path, monkeypatch, capsys):
    from lepton_mm import experiment as ledger

    loads = []

    def make_data(**kwargs):
        loads.append(kwargs)
        return data

    monkeypatch.setattr(peer, "make_data", make_data)
    argv = ["--methods", "concat", "--seeds", "0", "--epochs", "1", "--num-train", "200",
            "--num-val", "80", "--num-test", "80", "--results", str(tmp_path), "--no-progress"]
    assert peer.main(argv) == 0
    assert loads == [{"data_seed": 0, **SIZES}]
    path = tmp_path / "avmnist" / "peer_multibench_concat" / "seed0.json"
    record = ledger.read_record(path)
    assert set(ledger.REQUIRED_KEYS) <= set(record)
    assert (record["experiment"], record["method"], record["seed"]) == (
        "avmnist", "peer_multibench_concat", 0)
    assert record["numerics"] == ledger.NUMERICS and record["params"] == 260_922
    assert record["robustness"] is None and record["machine"]["device"] == "cpu"
    assert set(record["versions"]) == {"torch", "numpy", "lepton_mm"}
    m = record["metrics"]
    assert m["val_accuracy"] == max(h["val_accuracy"] for h in m["history"])
    assert m["best_epoch"] == 1 and m["epochs"] == 1
    history = m["history"][0]
    assert record["seconds_per_epoch"] == pytest.approx(
        history["train_seconds"] + history["val_seconds"], abs=2e-3)
    assert m["examples_per_second"] == pytest.approx(200 / history["train_seconds"], rel=0.01)
    runtime = record["torch_runtime"]
    assert runtime == {"num_threads": torch.get_num_threads(),
                       "mkldnn_enabled": torch.backends.mkldnn.enabled}
    assert record["config"]["epochs"] == 1 and record["config"]["num_train"] == 200
    # The stored command retrains exactly this run.
    command = record["command"]
    assert command.startswith("python benchmarks/peers/multibench_avmnist.py ")
    again = peer.parse_args(command.split()[2:])
    assert again.force and again.methods == ["concat"] and again.seeds == [0]
    assert ledger.config_hash(peer._settings("concat", again)) == record["config_hash"]

    mtime = path.stat().st_mtime_ns
    capsys.readouterr()
    assert peer.main(argv) == 0  # current: nothing trained, no data loaded
    assert path.stat().st_mtime_ns == mtime and len(loads) == 1
    assert "1 of 1 runs have a current record; training 0" in capsys.readouterr().out
    # Another epoch count is another config: the record is stale and retrained.
    assert peer.plan(peer.parse_args([*argv, "--epochs", "2"]))[0][0].method == (
        "peer_multibench_concat")


def test_shards_partition_what_is_left_to_do(peer, tmp_path):
    from lepton_mm import experiment as ledger

    args = _args(peer, tmp_path, "--seeds", "0,1")
    everything, current = peer.plan(args)
    assert current == 0 and len(everything) == 6
    shards = [peer.plan(_args(peer, tmp_path, "--seeds", "0,1", "--shard", f"{i}/3"))[0]
              for i in range(3)]
    assert set().union(*shards) == set(everything) and sum(map(len, shards)) == 6

    done = everything[0]  # a current record drops out of every shard
    settings = peer._settings("image", args)
    record = ledger.make_record(
        done, command="-", config=settings, numerics=ledger.NUMERICS,
        metrics={"test_accuracy": 0.5, "val_accuracy": 0.5}, robustness=None, params=1,
        seconds_per_epoch=1.0, peak_rss_mb=1.0, git_commit=None)
    assert done.method == "peer_multibench_image"
    ledger.Ledger(tmp_path, "avmnist").write(record)
    left, current = peer.plan(args)
    assert current == 1 and left == everything[1:]
    assert peer.plan(_args(peer, tmp_path, "--seeds", "0,1", "--force"))[0] == everything


@pytest.mark.parametrize("argv", [
    ["--methods", "image,nope"], ["--methods", "image,image"], ["--seeds", "-1"],
    ["--seeds", ""], ["--epochs", "0"], ["--num-train", "0"], ["--num-val", "5001"],
    ["--shard", "2/2"], ["--data-seed", "x"],
])
def test_nonsensical_flags_are_one_line_errors(peer, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        peer.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage:") and ": error: " in err[-1]
    assert not any(": error: " in line for line in err[:-1])  # the error is one line
