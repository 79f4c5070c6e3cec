"""Tests for lepton_mm.export: StableHLO round trip, any batch size, no model code."""

import doctest
import json
import subprocess
import sys
import textwrap
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lepton_mm.export as export_module
from lepton_mm import EncoderOutput
from lepton_mm.export import load, save


class _Prediction(NamedTuple):
    logits: jax.Array
    fused: EncoderOutput


class _ThrowawayFusion(nnx.Module):
    """Dict of EncoderOutput + an array -> NamedTuple; has batch norm, dropout with its
    own RNG stream (key-typed state) and a bfloat16 parameter."""

    def __init__(self, rngs):
        self.audio = nnx.Linear(4, 6, rngs=rngs)
        self.text = nnx.Linear(5, 6, param_dtype=jnp.bfloat16, rngs=rngs)
        self.norm = nnx.BatchNorm(6, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(6 + 2, 3, rngs=rngs)

    def __call__(self, modalities, extra):
        tokens = jnp.concatenate([self.audio(modalities["audio"].tokens),
                                  self.text(modalities["text"].tokens).astype(jnp.float32)],
                                 axis=1)
        mask = jnp.concatenate([modalities["audio"].mask, modalities["text"].mask], axis=1)
        fused = EncoderOutput.from_tokens(self.dropout(self.norm(tokens)), mask)
        logits = self.head(jnp.concatenate([fused.pooled, extra], axis=-1))
        return {"prediction": _Prediction(logits, fused), "aux": [extra * 2, None]}


def _inputs(batch, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    audio = EncoderOutput.from_tokens(jax.random.normal(keys[0], (batch, 3, 4)))
    text_mask = jnp.arange(2)[None, :] < jnp.arange(1, batch + 1)[:, None] % 3
    text = EncoderOutput.from_tokens(jax.random.normal(keys[1], (batch, 2, 5)), text_mask)
    extra = jax.random.normal(keys[2], (batch, 2))
    return {"audio": audio, "text": text}, extra


@pytest.fixture(scope="module")
def trained():
    """A model with non-trivial batch-norm statistics."""
    model = _ThrowawayFusion(nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(5))
    model.norm.mean[...] = jax.random.normal(keys[0], (6,))
    model.norm.var[...] = jax.random.uniform(keys[1], (6,), minval=0.5, maxval=2.0)
    return model


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "model"
    save(trained, _inputs(4), path)
    return path


@nnx.jit
def _eval_forward(model, inputs):
    return model(*inputs)


def _reference(model, inputs):
    copy = nnx.merge(*nnx.split(model))
    copy.eval()
    return _eval_forward(copy, inputs)


def _assert_trees_close(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_round_trip_matches_eval_forward(trained, exported):
    loaded = load(exported)
    inputs = _inputs(4, seed=1)
    got = loaded(*inputs)
    want = _reference(trained, inputs)
    assert isinstance(got["prediction"].fused, EncoderOutput)
    assert got["aux"][1] is None
    # The test's own NamedTuple comes back as an equivalent namedtuple.
    assert type(got["prediction"]).__name__ == "_Prediction"
    assert got["prediction"]._fields == ("logits", "fused")
    _assert_trees_close(tuple(got["prediction"]), tuple(want["prediction"]))
    _assert_trees_close(got["aux"], want["aux"])
    # Saving did not switch the caller's model to eval mode.
    assert trained.dropout.deterministic is False


@pytest.mark.parametrize("batch", [1, 7])
def test_other_batch_sizes(trained, exported, batch):
    inputs = _inputs(batch, seed=2)
    got = load(exported)(*inputs)
    want = _reference(trained, inputs)
    assert got["prediction"].logits.shape == (batch, 3)
    np.testing.assert_allclose(got["prediction"].logits, want["prediction"].logits,
                               rtol=1e-5, atol=1e-6)


def test_manifest_contents(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["format"] == "lepton_mm.export" and manifest["format_version"] == 1
    assert manifest["created_with"]["jax"] == jax.__version__
    leaves = {leaf["path"]: leaf for leaf in manifest["inputs"]["leaves"]}
    assert leaves["inputs[0]['audio'].tokens"] == {
        "path": "inputs[0]['audio'].tokens", "shape": ["b", 3, 4], "dtype": "float32"}
    weights = {w["name"]: w for w in manifest["weights"]}
    assert weights["text/kernel"]["dtype"] == "bfloat16"
    assert weights["text/kernel"]["storage_dtype"] == "uint16"
    assert weights["dropout/rngs/key"]["prng_impl"] is not None
    assert len(manifest["files"]["weights"]["sha256"]) == 64


def test_load_in_subprocess_without_model_code(trained, exported, tmp_path):
    inputs = _inputs(5, seed=3)
    modalities, extra = inputs
    np.savez(tmp_path / "inputs.npz", extra=extra,
             **{f"{m}_{f}": getattr(modalities[m], f) for m in modalities
                for f in EncoderOutput._fields})
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from lepton_mm import EncoderOutput
        from lepton_mm.export import load

        data = np.load({str(tmp_path / "inputs.npz")!r})
        modalities = {{m: EncoderOutput(*(data[f"{{m}}_{{f}}"] for f in EncoderOutput._fields))
                       for m in ("audio", "text")}}
        out = load({str(exported)!r})(modalities, data["extra"])
        np.savez({str(tmp_path / "outputs.npz")!r}, logits=out["prediction"].logits,
                 pooled=out["prediction"].fused.pooled, aux=out["aux"][0])
        leaked = [m for m in sys.modules if m.startswith(("flax", "tests", "test_export"))]
        assert not leaked, leaked
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    outputs = np.load(tmp_path / "outputs.npz")
    want = _reference(trained, inputs)
    np.testing.assert_allclose(outputs["logits"], want["prediction"].logits, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(outputs["pooled"], want["prediction"].fused.pooled,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs["aux"], want["aux"][0], rtol=1e-6)


def _copy_export(source, target):
    target.mkdir()
    for f in source.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


@pytest.mark.parametrize("name", ["weights.safetensors", "module.stablehlo"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_files_are_detected(exported, tmp_path, name, damage):
    path = _copy_export(exported, tmp_path / "copy")
    data = bytearray((path / name).read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    (path / name).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{path / name}: checksum mismatch"):
        load(path)


def test_bad_manifest_and_missing_export(exported, tmp_path):
    path = _copy_export(exported, tmp_path / "copy")
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"{path / 'manifest.json'}: not a valid"):
        load(path)
    with pytest.raises(FileNotFoundError, match="manifest"):
        load(tmp_path / "nothing")


def test_wrong_inputs_raise_before_running(exported):
    loaded = load(exported)
    modalities, extra = _inputs(4)
    with pytest.raises(ValueError, match=r"^inputs\[0\]\['audio'\]\.tokens: expected shape"):
        bad = dict(modalities, audio=EncoderOutput.from_tokens(jnp.zeros((4, 3, 7))))
        loaded(bad, extra)
    with pytest.raises(ValueError, match=r"^inputs\[1\]: .*axis 'batch' should be 4"):
        loaded(modalities, extra[:3])
    with pytest.raises(TypeError, match=r"^inputs\[1\]: expected dtype float32"):
        loaded(modalities, extra.astype(jnp.int32))
    with pytest.raises(TypeError, match=r"^inputs: expected 2 positional"):
        loaded(modalities)
    with pytest.raises(ValueError, match=r"^inputs: the structure differs"):
        loaded({"audio": modalities["audio"]}, extra)
    with pytest.raises(ValueError, match=r"inputs\[0\]\['audio'\]\.tokens.*empty"):
        loaded(*_inputs(0))


def test_atomic_write_and_overwrite(trained, tmp_path, monkeypatch):
    path = tmp_path / "model"
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    save(model, jnp.zeros((1, 2)), path)
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite"):
        save(model, jnp.zeros((1, 2)), path)

    def crash_on_weights(target, data):
        if target.name == "weights.safetensors":
            raise OSError("disk full")
        target.write_bytes(data)

    monkeypatch.setattr(export_module, "_write", crash_on_weights)
    with pytest.raises(OSError, match="disk full"):
        save(nnx.Linear(2, 3, rngs=nnx.Rngs(1)), jnp.zeros((1, 2)), path, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save(model, jnp.zeros((1, 2)), tmp_path / "fresh")
    monkeypatch.undo()
    # The old export is intact, nothing half-written exists, no temp dirs are left.
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    save(nnx.Linear(2, 3, rngs=nnx.Rngs(1)), jnp.zeros((1, 2)), path, overwrite=True)
    assert load(path)(jnp.ones((2, 2))).shape == (2, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_save_rejects_bad_arguments(tmp_path):
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="^model"):
        save(lambda x: x, jnp.zeros((1, 2)), tmp_path / "a")
    with pytest.raises(ValueError, match=r"example_inputs\[1\]: .*axis 'batch' should be 2"):
        save(model, (jnp.zeros((2, 2)), jnp.zeros((3, 2))), tmp_path / "a",
             forward=lambda m, x, y: m(x))
    with pytest.raises(ValueError, match=r"example_inputs\[0\]: expected a leading batch"):
        save(model, jnp.zeros(()), tmp_path / "a")
    with pytest.raises(TypeError, match=r"^outputs: unsupported type"):
        save(model, jnp.zeros((1, 2)), tmp_path / "a", forward=lambda m, x: {1, 2})
    with pytest.raises(ValueError, match="^model: exporting .* symbolic batch size"):
        save(model, jnp.zeros((4, 2)), tmp_path / "a",
             forward=lambda m, x: m(x).reshape(2, -1, 3))
    assert not any(tmp_path.iterdir())


def test_docstring_examples():
    results = doctest.testmod(export_module, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0
