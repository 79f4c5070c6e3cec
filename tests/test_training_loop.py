"""lepton_mm.training.fit / evaluate / predict on a tiny bimodal model and on token
sequences from a ``BucketedDataset``; raw optax transformations."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _sources import CrashAfter
from flax import nnx

from lepton_mm.data import BucketedDataset
from lepton_mm.encoders import ImageCNN
from lepton_mm.models import Classification, Contrastive, TwoTower, build_classifier
from lepton_mm.training import (
    ArrayDataset,
    Checkpointer,
    CheckpointMismatchError,
    OptimizerConfig,
    epoch_permutation,
    evaluate,
    fit,
    load_model,
    make_optimizer,
    read_log,
    seed_rngs,
)
from lepton_mm.training.loop import _clear_compiled_steps
from lepton_mm.types import EncoderOutput

N, BATCH = 20, 8  # 3 batches per epoch, the last one padded (4 of 8 rows valid)


class Frames(nnx.Module):
    def __init__(self, features, dim, rngs):
        self.dim = dim
        self.proj = nnx.Linear(features, dim, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)

    def __call__(self, x, mask):
        return EncoderOutput.from_tokens(self.drop(jnp.tanh(self.proj(x))), mask)


def make_data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    return {
        "image": (rng.normal(size=(n, 8, 8, 1)) + y[:, None, None, None]).astype(np.float32),
        "audio": ((rng.normal(size=(n, 5, 3)) - y[:, None, None]).astype(np.float32),
                  np.arange(5)[None] < rng.integers(1, 6, n)[:, None]),
        "label": y.astype(np.int32),
        "present": {"audio": rng.random(n) > 0.25},
    }


def make_model(seed=0, fusion_dim=6):
    rngs = seed_rngs(seed)
    encoders = {"image": ImageCNN(1, dim=6, widths=(4,), dropout=0.1, rngs=rngs),
                "audio": Frames(3, 5, rngs)}
    return build_classifier(encoders, "concat", num_outputs=3, fusion_dim=fusion_dim,
                            rngs=rngs)


def params_of(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.Param)))]


def run(workdir, seed=0, **kw):
    model = make_model(seed)
    kw = {"eval_data": make_data(12, seed=1), "epochs": 2, "batch_size": BATCH,
          "optimizer": OptimizerConfig(learning_rate=0.02), **kw}
    result = fit(model, Classification(3), make_data(), workdir=workdir, seed=seed, **kw)
    return model, result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fit")
    _clear_compiled_steps()  # another test in this worker may have compiled this model
    model, result = run(workdir)
    return workdir, model, result


def test_fit_trains_logs_and_checkpoints(trained):
    workdir, model, result = trained
    assert result.step == 6 and len(result.history) == 2
    assert result.num_compilations == {"train_step": 1, "eval_step": 1}
    assert result.resumed_from is None and not result.stopped_early
    assert set(result.best_metrics) == {"accuracy", "f1", "loss"}
    assert result.best_step in (3, 6)
    assert Path(result.final_params_path) == workdir / "checkpoints" / str(result.best_step)
    assert result.num_params == sum(p.size for p in params_of(model))
    records = read_log(workdir / "log.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert [r["step"] for r in epochs] == [3, 6]
    assert epochs[0]["eval"] == result.history[0]["eval"]
    assert (workdir / "curves.png").stat().st_size > 1000
    # The model ends in eval mode holding the best checkpoint: evaluating it
    # reproduces the best metrics exactly.
    assert model.encoders["image"].norms[0].use_running_average
    assert evaluate(model, Classification(3), make_data(12, seed=1), batch_size=5) == \
        pytest.approx(result.best_metrics, rel=1e-6)
    best = load_model(workdir, make_model)
    for a, b in zip(params_of(best), params_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_same_seed_same_result_other_seed_differs(trained, tmp_path):
    _, model, result = trained
    again_model, again = run(tmp_path / "again")
    assert again.history == result.history
    for a, b in zip(params_of(again_model), params_of(model), strict=True):
        np.testing.assert_array_equal(a, b)
    other_model, other = run(tmp_path / "other", seed=1)
    assert other.history != result.history
    assert not all(np.array_equal(a, b) for a, b in
                   zip(params_of(other_model), params_of(model), strict=True))


def test_rerun_of_finished_run_resumes_without_training(trained):
    workdir, model, result = trained
    model2, again = run(workdir)
    assert again.resumed_from == result.step and again.step == result.step
    assert again.history == result.history and again.best_step == result.best_step
    assert again.num_compilations["train_step"] == 0
    for a, b in zip(params_of(model2), params_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_resuming_in_the_same_process_compiles_nothing(tmp_path):
    """A restored state is placed as a fresh one is, so the resumed run reuses the
    compiled train and eval steps (XLA backend compilations counted, not traces)."""
    from jax import monitoring

    compiles = []

    def listener(event, duration, **kwargs):
        del duration, kwargs
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    monitoring.register_event_duration_secs_listener(listener)
    try:
        def go(epochs):  # a model of its own, so its steps are compiled here first
            return fit(make_model(fusion_dim=7), Classification(3), make_data(),
                       workdir=tmp_path, epochs=epochs, batch_size=BATCH,
                       eval_data=make_data(12, seed=1),
                       optimizer=OptimizerConfig(learning_rate=0.02))

        go(1)
        fresh = len(compiles)
        del compiles[:]
        resumed = go(2)
        assert resumed.resumed_from is not None and len(resumed.history) == 2
        assert fresh > 0 and compiles == []
    finally:
        monitoring.unregister_event_duration_listener(listener)


def test_workdir_of_a_different_model_fails_before_compute(trained):
    workdir, _, _ = trained
    log_before = (workdir / "log.jsonl").read_text()
    steps_before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    with pytest.raises(CheckpointMismatchError,
                       match=rf"{workdir}.*different model.*'fusion/.*kernel'.*\(11, 9\)"):
        fit(make_model(fusion_dim=9), Classification(3), make_data(), workdir=workdir,
            batch_size=BATCH)
    with pytest.raises(CheckpointMismatchError, match=r"different seed"):
        run(workdir, seed=5)
    assert (workdir / "log.jsonl").read_text() == log_before
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == steps_before


@pytest.mark.parametrize("kwargs, error, match", [
    ({"monitor": "auc"}, ValueError, r"monitor: 'auc' is not a metric.*accuracy"),
    ({"mode": "maximum"}, ValueError, "mode"),
    ({"nan_policy": "ignore"}, ValueError, "nan_policy"),
    ({"eval_data": None, "early_stopping_patience": 2}, ValueError, "needs eval_data"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"mesh": "tpu"}, ValueError, "mesh"),
])
def test_bad_arguments_fail_before_compute(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        run(tmp_path, **kwargs)
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_optimizer_and_missing_modality(tmp_path):
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        OptimizerConfig(name="lamb")
    data = make_data()
    del data["audio"]
    with pytest.raises(ValueError, match="train_data: batch: missing modality 'audio'"):
        fit(make_model(), Classification(3), data, workdir=tmp_path, batch_size=BATCH)
    data = make_data()
    del data["label"]
    with pytest.raises(ValueError, match="train_data: .*needs batch\\['label'\\]"):
        fit(make_model(), Classification(3), data, workdir=tmp_path, batch_size=BATCH)
    assert not (tmp_path / "checkpoints").exists()


def test_early_stopping_restores_the_best_checkpoint(tmp_path):
    # mode="max" on the eval loss: the first epoch (before training lowers it) is best.
    model, result = run(tmp_path, epochs=5, early_stopping_patience=2, monitor="loss",
                        mode="max", optimizer=OptimizerConfig(learning_rate=0.05))
    assert result.stopped_early
    assert len(result.history) == 3 and result.best_step == 3
    assert result.best_metrics == result.history[0]["eval"]
    first = load_model(tmp_path, make_model, step=3)
    last = load_model(tmp_path, make_model, step="latest")
    for a, b in zip(params_of(first), params_of(model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in
                   zip(params_of(last), params_of(model), strict=True))


def test_non_finite_loss_stops_with_the_step_and_last_checkpoint(tmp_path):
    data = make_data()
    bad = int(epoch_permutation(N, 0, 0)[BATCH])  # first example of batch 2, epoch 0
    data["image"][bad] = np.nan
    with pytest.raises(FloatingPointError,
                       match=r"non-finite loss.*at step 2 \(epoch 1, batch 2\).*"
                             r"Last good checkpoint: .*checkpoints/1 \(step 1\)"):
        fit(make_model(), Classification(3), data, workdir=tmp_path / "raise",
            batch_size=BATCH, checkpoint_every=1)

    model = make_model()
    result = fit(model, Classification(3), data, workdir=tmp_path / "skip", epochs=2,
                 batch_size=BATCH, nan_policy="skip")
    # a batch holding the bad example (even as a padding row) gives a NaN gradient
    expected = [sum(bad in idx for idx, _ in ArrayDataset(data).batch_indices(
        BATCH, seed=0, epoch=e)) for e in range(2)]
    assert [r["skipped_steps"] for r in result.history] == expected
    assert all(np.all(np.isfinite(p)) for p in params_of(model))
    assert result.step == 6


def test_two_tower_contrastive_fit(tmp_path):
    rngs = seed_rngs(0)
    model = TwoTower(Frames(3, 5, rngs), ImageCNN(1, dim=6, widths=(4,), rngs=rngs),
                     nnx.Linear(5, 4, rngs=rngs), nnx.Linear(6, 4, rngs=rngs),
                     modalities=("audio", "image"))
    data = make_data()
    del data["label"]
    result = fit(model, Contrastive(ks=(1, 3)), data, eval_data=data, workdir=tmp_path,
                 epochs=1, batch_size=BATCH)
    assert set(result.best_metrics) == set(Contrastive(ks=(1, 3)).metric_names)
    assert 0.0 <= result.best_metrics["recall"] <= 1.0
    with pytest.raises(ValueError, match="TwoTower does not take a modality_dropout"):
        fit(model, Contrastive(), data, workdir=tmp_path / "md", modality_dropout=0.5)


def test_array_dataset_batches_cover_each_example_once():
    data = ArrayDataset(make_data())
    assert len(data) == N and data.num_batches(BATCH) == 3
    seen = []
    batches = list(data.batches(BATCH, seed=3, epoch=1))
    for batch in batches:
        assert batch["image"].shape == (BATCH, 8, 8, 1)
        assert batch["audio"][1].shape == (BATCH, 5)
        seen.extend(batch["label"][batch["valid"]].tolist())
    assert [int(b["valid"].sum()) for b in batches] == [8, 8, 4]
    order = epoch_permutation(N, 3, 1)
    assert seen == data.arrays["label"][order].tolist()
    assert not np.array_equal(order, epoch_permutation(N, 3, 2))
    np.testing.assert_array_equal(order, epoch_permutation(N, 3, 1))
    resumed = list(data.batches(BATCH, seed=3, epoch=1, start=2))
    np.testing.assert_array_equal(resumed[0]["label"], batches[2]["label"])
    with pytest.raises(ValueError, match="leading sizes differ"):
        ArrayDataset({"a": np.zeros(3), "label": np.zeros(4)})


class RootFrames(nnx.Module):
    """Finite forward pass everywhere, but an all-zero input row gives NaN gradients
    (d sqrt(u)/du = inf at u = 0, times du/dW = 0): a non-finite *gradient* with a
    finite loss."""

    def __init__(self, features, dim, rngs):
        self.dim = dim
        self.proj = nnx.Linear(features, dim, use_bias=False, rngs=rngs)

    def __call__(self, x, mask):
        return EncoderOutput.from_tokens(jnp.sqrt(jnp.abs(self.proj(x))), mask)


def _root_model():
    rngs = seed_rngs(0)
    encoders = {"image": ImageCNN(1, dim=6, widths=(4,), rngs=rngs),
                "audio": RootFrames(3, 5, rngs)}
    return build_classifier(encoders, "concat", num_outputs=3, fusion_dim=6, rngs=rngs)


def _checkpoints_on_disk(workdir, model):
    """``{step: (model leaves, optimiser leaves)}`` of every checkpoint in ``workdir``."""
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    opt_like = jax.eval_shape(make_optimizer(OptimizerConfig(learning_rate=0.02)).init, params)
    ckpt = Checkpointer(workdir, read_only=True)
    out = {}
    for step in ckpt.steps():
        state, opt, _ = ckpt.restore(step, model_state=nnx.as_pure(nnx.state(model)),
                                     opt_state=opt_like)
        leaves = [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
            x.dtype, jax.dtypes.prng_key) else x) for x in jax.tree.leaves(state)]
        out[step] = (leaves, [np.asarray(x) for x in jax.tree.leaves(opt)])
    ckpt.close()
    return out


def _all_finite(leaves):
    return all(np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.floating))


def test_non_finite_gradient_with_finite_loss_and_checkpoints_stay_finite(tmp_path):
    data = make_data()
    bad = int(epoch_permutation(N, 0, 0)[BATCH])  # first example of batch 2, epoch 0
    data["audio"][0][bad] = 0.0  # finite forward, NaN gradient
    kw = {"batch_size": BATCH, "checkpoint_every": 1, "keep_checkpoints": 20,
          "optimizer": OptimizerConfig(learning_rate=0.02)}
    with pytest.raises(FloatingPointError,
                       match=r"non-finite loss \(\d[\d.e+-]*\) or gradient norm \(nan\) at step 2 "
                             r"\(epoch 1, batch 2\).*Last good checkpoint: .*checkpoints/1 "
                             r"\(step 1\)"):
        fit(_root_model(), Classification(3), data, workdir=tmp_path / "raise", **kw)
    on_disk = _checkpoints_on_disk(tmp_path / "raise", _root_model())
    assert list(on_disk) == [1]
    assert all(_all_finite(m) and _all_finite(o) for m, o in on_disk.values())

    model = _root_model()
    result = fit(model, Classification(3), data, workdir=tmp_path / "skip", epochs=2,
                 nan_policy="skip", **kw)
    skipped = [r["step"] for r in read_log(tmp_path / "skip" / "log.jsonl")
               if r["kind"] == "step" and not r["finite"]]
    assert skipped and sum(r["skipped_steps"] for r in result.history) == len(skipped)
    on_disk = _checkpoints_on_disk(tmp_path / "skip", model)
    assert sorted(on_disk) == list(range(1, 7))
    for step, (model_leaves, opt_leaves) in on_disk.items():
        assert _all_finite(model_leaves) and _all_finite(opt_leaves), step
        if step in skipped:  # the update, RNG draws included, was not applied at all
            previous = on_disk[step - 1]
            for a, b in zip(model_leaves + opt_leaves, previous[0] + previous[1], strict=True):
                np.testing.assert_array_equal(a, b)
    assert _all_finite(params_of(model))


def test_relative_workdir_is_resolved_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, result = run("runs/relative", epochs=1)
    assert (tmp_path / "runs" / "relative" / "log.jsonl").exists()
    assert result.best_step > 0


def test_repeated_evaluate_reuses_the_compiled_step(trained):
    from lepton_mm.training import loop

    _, model, _ = trained
    data = make_data(12, seed=1)
    first = evaluate(model, Classification(3), data, batch_size=BATCH)
    graphdef, _, _ = loop._split_eval(model)
    step = loop._cached_eval_step(graphdef, None)
    traces = step.traces.count
    assert traces >= 1
    # Another dataset of the same shapes, and the same one again: no retrace.
    other = evaluate(model, Classification(3), make_data(12, seed=2), batch_size=BATCH)
    again = evaluate(model, Classification(3), data, batch_size=BATCH)
    assert step.traces.count == traces
    assert again == first and other != first


def test_checkpoints_from_before_a_new_optimizer_field_still_match():
    import dataclasses

    from lepton_mm.training import loop

    current = loop._plain(dataclasses.asdict(OptimizerConfig(learning_rate=0.02)))
    old = {k: v for k, v in current.items() if k != "lr_multipliers"}  # older version
    assert loop._saved_setting({"optimizer": old}, "optimizer") == current
    changed = {**old, "learning_rate": 0.5}
    assert loop._saved_setting({"optimizer": changed}, "optimizer") != current
    assert loop._saved_setting({"seed": 3}, "seed") == 3


# ------------------------------------------------------ optax transformations, sources


def test_raw_optax_transformation_equals_its_config_and_reuses_the_compiled_step(tmp_path):
    import optax

    config_model, by_config = run(tmp_path / "config", epochs=1, eval_data=None,
                                  optimizer=OptimizerConfig(name="sgd", learning_rate=0.1,
                                                            momentum=0.9))
    tx = optax.sgd(0.1, momentum=0.9)
    raw_model, raw = run(tmp_path / "raw", epochs=1, eval_data=None, optimizer=tx,
                         optimizer_name="sgd-0.1")
    assert raw.step == by_config.step == 3
    for a, b in zip(params_of(raw_model), params_of(config_model), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert raw.history[0]["train_loss"] == pytest.approx(by_config.history[0]["train_loss"])
    saved = Checkpointer(tmp_path / "raw", read_only=True)
    assert saved.read_meta(saved.latest_step())["config"]["optimizer"] == "sgd-0.1"
    saved.close()
    # The same transformation object again (another seed): nothing recompiles.
    _, again = run(tmp_path / "raw_seed1", seed=1, epochs=1, eval_data=None, optimizer=tx,
                   optimizer_name="sgd-0.1")
    assert again.num_compilations["train_step"] == 0

    # Resuming needs the same name; a config is no match for a raw transformation.
    with pytest.raises(CheckpointMismatchError, match=r"different optimizer: 'sgd-0.1'"):
        run(tmp_path / "raw", epochs=2, eval_data=None, optimizer=optax.sgd(0.1),
            optimizer_name="sgd-nesterov")
    with pytest.raises(CheckpointMismatchError, match="different optimizer"):
        run(tmp_path / "raw", epochs=2, eval_data=None,
            optimizer=OptimizerConfig(name="sgd", learning_rate=0.1, momentum=0.9))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"optimizer": "adam"}, TypeError, "OptimizerConfig or an optax"),
    ({"optimizer": "tx"}, ValueError, "optimizer_name: a raw optax transformation needs"),
    ({"optimizer_name": "adam"}, ValueError, "optimizer_name: only for a raw"),
])
def test_optimizer_name_is_required_exactly_for_raw_transformations(tmp_path, kwargs, error,
                                                                     match):
    import optax

    if kwargs.get("optimizer") == "tx":
        kwargs = {"optimizer": optax.adam(1e-3)}
    with pytest.raises(error, match=match):
        fit(make_model(), Classification(3), make_data(), workdir=tmp_path, **kwargs)
    assert not (tmp_path / "checkpoints").exists()


def test_data_that_is_not_a_batch_source_fails_before_compute(tmp_path):
    with pytest.raises(TypeError, match=r"train_data: expected a batch source .*got list"):
        fit(make_model(), Classification(3), [make_data()], workdir=tmp_path)
    with pytest.raises(TypeError, match=r"data: expected a batch source"):
        evaluate(make_model(), Classification(3), (1, 2))
    assert not (tmp_path / "checkpoints").exists()


VOCAB, T = 12, 20


class Tokens(nnx.Module):
    """Embeds token ids and mean-pools them over the mask (a sequence encoder)."""

    def __init__(self, dim, rngs):
        self.dim = dim
        self.embed = nnx.Embed(VOCAB, dim, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)

    def __call__(self, ids, mask):
        return EncoderOutput.from_tokens(self.drop(self.embed(ids)), mask)


def token_model(seed=0):
    rngs = seed_rngs(seed)
    return build_classifier({"text": Tokens(6, rngs)}, None, num_outputs=3, rngs=rngs)


def token_data(n=22, seed=0):
    """Sequences of 1..T tokens whose ids shift with the label, padded to T."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    lengths = rng.integers(1, T + 1, n)
    mask = np.arange(T)[None] < lengths[:, None]
    ids = np.where(mask, (rng.integers(0, 4, (n, T)) + 4 * y[:, None]) % VOCAB, 0)
    return {"text": (ids.astype(np.int32), mask), "label": y.astype(np.int32)}, lengths


def test_bucketed_source_trains_compiles_once_per_bucket_and_resumes_mid_epoch(tmp_path):
    arrays, lengths = token_data()
    bounds = (4, 8, 20)
    source = BucketedDataset(arrays, {"text": lengths}, bucket_bounds=bounds)
    eval_arrays, eval_lengths = token_data(9, seed=1)
    eval_source = BucketedDataset(eval_arrays, {"text": eval_lengths}, bucket_bounds=bounds)
    kw = {"eval_data": eval_source, "epochs": 2, "batch_size": 4, "seed": 2,
          "checkpoint_every": 2, "keep_checkpoints": 20,
          "optimizer": OptimizerConfig(learning_rate=0.03)}
    steps_per_epoch = source.num_batches(4)
    assert source.num_buckets() == 3 and steps_per_epoch > len(arrays["label"]) // 4

    reference = token_model()
    _clear_compiled_steps()
    uninterrupted = fit(reference, Classification(3), source, workdir=tmp_path / "ref", **kw)
    assert uninterrupted.step == 2 * steps_per_epoch
    # one shape per bucket, for the train step and for the eval step
    assert uninterrupted.num_compilations == {"train_step": 3,
                                              "eval_step": eval_source.num_buckets()}
    # the eval metrics over the buckets are those over the examples in dataset order
    assert evaluate(reference, Classification(3), eval_arrays, batch_size=4) == \
        pytest.approx(evaluate(reference, Classification(3), eval_source, batch_size=4))

    crash_after = steps_per_epoch + 3  # three batches into the second epoch
    crashing = CrashAfter(BucketedDataset(arrays, {"text": lengths}, bucket_bounds=bounds),
                          after=crash_after)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(token_model(), Classification(3), crashing, workdir=tmp_path / "run", **kw)
    ckpt = Checkpointer(tmp_path / "run", read_only=True)
    last = ckpt.latest_step()
    ckpt.close()
    assert steps_per_epoch < last < 2 * steps_per_epoch  # a mid-epoch checkpoint

    resumed_model = token_model()
    resumed = fit(resumed_model, Classification(3), source, workdir=tmp_path / "run", **kw)
    assert resumed.resumed_from == last and resumed.step == uninterrupted.step
    assert resumed.history == uninterrupted.history
    assert resumed.best_step == uninterrupted.best_step
    for a, b in zip(params_of(resumed_model), params_of(reference), strict=True):
        np.testing.assert_array_equal(a, b)


def test_predict_returns_outputs_in_example_order(trained):
    from lepton_mm.training import predict

    _, model, _ = trained
    data = make_data(12, seed=1)
    logits = predict(model, data, batch_size=5)
    assert logits.shape == (12, 3)
    one_by_one = np.concatenate([predict(model, ArrayDataset(data)[[i]], batch_size=1)
                                 for i in range(12)])
    np.testing.assert_allclose(logits, one_by_one, rtol=1e-5, atol=1e-6)
    assert evaluate(model, Classification(3), data, batch_size=5)["accuracy"] == \
        pytest.approx(np.mean(logits.argmax(1) == data["label"]))
