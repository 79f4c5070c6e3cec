"""lepton_mm.models.PromptMatcher: logits against frozen prompts, templates, training."""

import jax
import numpy as np
import pytest
from flax import nnx

from lepton_mm.models import Classification, PromptMatcher
from lepton_mm.training import fit, seed_rngs
from lepton_mm.types import EncoderOutput

N, FEATURES, TEXT_DIM, CLASSES = 12, 5, 6, 3


class Frames(nnx.Module):
    def __init__(self, rngs):
        self.dim = 4
        self.proj = nnx.Linear(FEATURES, 4, rngs=rngs)

    def __call__(self, x, mask):
        return EncoderOutput.from_tokens(self.proj(x), mask)


def prompt_table(seed=0, templates=2):
    table = np.random.default_rng(seed).normal(size=(templates, CLASSES, TEXT_DIM))
    return (table / np.linalg.norm(table, axis=-1, keepdims=True)).astype(np.float32)


def make_batch(n=N, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = (rng.normal(size=(n, 7, FEATURES)) + y[:, None, None]).astype(np.float32)
    mask = np.arange(7)[None] < rng.integers(1, 8, n)[:, None]
    return {"audio": (x, mask), "label": y.astype(np.int32),
            "template": rng.integers(0, 2, n).astype(np.int32)}


def test_logits_are_the_scaled_cosine_with_each_examples_template():
    table = prompt_table()
    model = PromptMatcher(Frames(nnx.Rngs(0)), table, rngs=nnx.Rngs(1))
    batch = make_batch()
    logits = np.asarray(model(batch))
    z = np.asarray(model.embed(batch["audio"]))
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    scale = float(model.scale()[0])
    assert scale == pytest.approx(1 / 0.07, rel=1e-5)
    expected = scale * np.einsum("bd,bcd->bc", z, table[batch["template"]])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    # another template, other logits; a one-template table needs no template index
    other = np.asarray(model({**batch, "template": 1 - batch["template"]}))
    assert not np.allclose(other, logits)
    single = PromptMatcher(Frames(nnx.Rngs(0)), table[:1], rngs=nnx.Rngs(1))
    no_key = {k: v for k, v in batch.items() if k != "template"}
    np.testing.assert_allclose(np.asarray(single(no_key)),
                               scale * np.asarray(single.embed(batch["audio"])) @ table[0].T,
                               rtol=1e-5, atol=1e-5)


def test_training_moves_the_encoder_and_projection_never_the_prompts(tmp_path):
    table = prompt_table()
    rngs = seed_rngs(0)
    model = PromptMatcher(Frames(rngs), table, rngs=rngs)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    fit(model, Classification(CLASSES), make_batch(), workdir=tmp_path, epochs=2,
        batch_size=4)
    np.testing.assert_array_equal(np.asarray(model.prompts[...]), table)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
    assert changed["encoder"]["proj"]["kernel"] and changed["projection"]["layers"][0]["kernel"]
    assert "prompts" not in after  # not a parameter


@pytest.mark.parametrize("change, match", [
    (lambda b: {k: v for k, v in b.items() if k != "template"}, "missing 'template'"),
    (lambda b: {**b, "template": np.full(N, 2, np.int32)}, r"indices in \[0, 2\)"),
    (lambda b: {**b, "template": np.zeros(N, np.float32)}, "template"),
    (lambda b: {k: v for k, v in b.items() if k != "audio"}, "missing modality 'audio'"),
])
def test_bad_batches_are_named(change, match):
    model = PromptMatcher(Frames(nnx.Rngs(0)), prompt_table(), rngs=nnx.Rngs(1))
    with pytest.raises((ValueError, TypeError), match=match):
        model.check_batch(change(make_batch()))


def test_bad_prompts_fail_at_construction():
    with pytest.raises(ValueError, match=r"prompts: expected float \[templates"):
        PromptMatcher(Frames(nnx.Rngs(0)), prompt_table()[0], rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="encoder: expected a `.dim`"):
        PromptMatcher(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), prompt_table(), rngs=nnx.Rngs(1))
