"""lepton_mm.encoders.recurrent: RecurrentEncoder / RecurrentTextEncoder.

References: ``torch.nn.GRU`` / ``torch.nn.LSTM`` on packed sequences with the same weights
(skipped without torch), the encoder on the compacted valid frames (masks with holes),
and the encoder on the same data with other padding values or more padding.
"""

import doctest
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lepton_mm.encoders import RecurrentEncoder, RecurrentTextEncoder, recurrent
from lepton_mm.functional import functional
from lepton_mm.models import Classification, build_classifier
from lepton_mm.training import OptimizerConfig, fit, read_log, seed_rngs

B, T, F, H = 4, 7, 5, 3
LENGTHS = np.array([7, 3, 1, 5])
MASK = np.arange(T)[None] < LENGTHS[:, None]  # [B, T], right-padded
CASES = [(cell, bidi) for cell in ("gru", "lstm") for bidi in (False, True)]


def frames(seed=0, shape=(B, T, F)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def garbage(x, mask, seed=1):
    """``x`` with large random values at masked frames."""
    noise = 1e4 * np.random.default_rng(seed).normal(size=x.shape).astype(x.dtype)
    return np.where(mask[..., None], x, noise)


def randomize(model, seed=0, scale=0.5):
    """Sets every parameter to N(0, scale^2) (biases included, so their layout is tested)."""
    rng = np.random.default_rng(seed)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(
        lambda x: jnp.asarray(scale * rng.normal(size=x.shape), x.dtype), params))
    return model


@nnx.jit
def forward(model, x, mask, rngs=None):
    """``model(x, mask, rngs=rngs)``, compiled once per model structure and shape (the
    encoders run op by op otherwise, and each eager ``lax.scan`` compiles anew)."""
    return model(x, mask, rngs=rngs)


def make(cell="gru", bidi=False, *, layers=2, dim=None, **kw):
    dim = dim or (2 * H if bidi else H)
    model = RecurrentEncoder(F, dim=dim, cell=cell, hidden_size=H, num_layers=layers,
                             bidirectional=bidi, rngs=nnx.Rngs(0), **kw)
    randomize(model)
    model.eval()
    return model


# ------------------------------------------------------------------ PyTorch reference


def to_torch(model: RecurrentEncoder) -> Any:
    """A ``torch.nn.GRU``/``LSTM`` with ``model``'s weights.

    Flax's kernels are ``[in, gates * hidden]`` with PyTorch's gate order (GRU ``r, z, n``,
    LSTM ``i, f, g, o``), so PyTorch's ``weight_*`` are their transposes. Flax's GRU has
    its only bias on the input side (``b_in`` outside the reset gate: PyTorch's
    ``bias_ih``) and no recurrent bias (``bias_hh = 0``); its LSTM has its only bias on
    the recurrent side (PyTorch's ``bias_ih + bias_hh``).
    """
    torch = pytest.importorskip("torch")
    kind = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[model.cell]
    rnn = kind(model.features, model.hidden_size, num_layers=model.num_layers,
               batch_first=True, bidirectional=model.bidirectional)
    directions = [("", model.forward_cells)]
    if model.bidirectional:
        directions.append(("_reverse", model.backward_cells))
    as_torch = lambda a: torch.from_numpy(np.array(a, np.float32))
    with torch.no_grad():
        for suffix, cells in directions:
            for layer, cell in enumerate(cells):
                name = f"l{layer}{suffix}"
                w_i, w_h = cell.dense_i.kernel[...], cell.dense_h.kernel[...]
                getattr(rnn, f"weight_ih_{name}").copy_(as_torch(w_i.T))
                getattr(rnn, f"weight_hh_{name}").copy_(as_torch(w_h.T))
                zeros = np.zeros(w_i.shape[1], np.float32)
                if model.cell == "gru":
                    b_ih, b_hh = cell.dense_i.bias[...], zeros
                else:
                    b_ih, b_hh = zeros, cell.dense_h.bias[...]
                getattr(rnn, f"bias_ih_{name}").copy_(as_torch(b_ih))
                getattr(rnn, f"bias_hh_{name}").copy_(as_torch(b_hh))
    return rnn.eval()


def torch_packed(rnn, x, lengths):
    """PyTorch's output on ``pack_padded_sequence`` input, zero-padded to ``x``'s time."""
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    packed = pack_padded_sequence(torch.from_numpy(x), torch.from_numpy(lengths),
                                  batch_first=True, enforce_sorted=False)
    with torch.no_grad():
        out, _ = rnn(packed)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    return out.numpy()


@pytest.mark.parametrize(("cell", "bidi"), CASES)
def test_matches_torch_on_packed_sequences(cell, bidi):
    pytest.importorskip("torch")
    model = make(cell, bidi)
    x = frames()
    want = torch_packed(to_torch(model), x, LENGTHS)  # [B, T, directions * H]
    out = forward(model, garbage(x, MASK), MASK)
    np.testing.assert_allclose(out.tokens, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.mask, MASK)
    pooled = want.sum(axis=1) / LENGTHS[:, None]
    np.testing.assert_allclose(out.pooled, pooled, rtol=1e-5, atol=1e-5)


def test_matches_torch_with_a_projection_and_one_layer():
    pytest.importorskip("torch")
    model = make("lstm", True, layers=1, dim=4)  # 2 * H = 6 states -> proj to 4
    assert model.proj is not None
    x = frames(3)
    states = torch_packed(to_torch(model), x, LENGTHS)
    want = np.where(MASK[..., None], model.proj(jnp.asarray(states)), 0)
    out = forward(model, x, MASK)
    np.testing.assert_allclose(out.tokens, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ masking


@pytest.mark.parametrize(("cell", "bidi"), CASES)
def test_padding_values_and_length_do_not_matter(cell, bidi):
    model = make(cell, bidi)
    x, mask = frames(), MASK
    ref = forward(model, x, mask)
    # Other values at padded frames (huge, +-inf, NaN): bitwise the same.
    for noisy in (garbage(x, mask), np.where(mask[..., None], x, np.inf),
                  np.where(mask[..., None], x, np.nan)):
        out = forward(model, noisy, mask)
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        np.testing.assert_array_equal(out.pooled, ref.pooled)
    # Eight more padded frames: the same tokens bitwise (each step is the same
    # computation); pooled sums more zeros, equal to float32 rounding.
    longer = garbage(np.concatenate([x, frames(5, (B, 8, F))], axis=1),
                     np.pad(mask, ((0, 0), (0, 8))))
    out = forward(model, longer, np.pad(mask, ((0, 0), (0, 8))))
    np.testing.assert_array_equal(out.tokens[:, :T], ref.tokens)
    assert not np.any(out.tokens[:, T:])
    np.testing.assert_allclose(out.pooled, ref.pooled, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("cell", "bidi"), [("gru", True), ("lstm", True)])
def test_holes_in_the_mask_equal_the_compacted_sequence(cell, bidi):
    model = make(cell, bidi)
    x = frames(2)
    mask = np.array([[1, 0, 1, 1, 0, 0, 1], [0, 0, 1, 0, 1, 0, 0],
                     [1, 1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 0, 1, 0]], bool)
    packed, packed_mask = np.zeros_like(x), np.zeros_like(mask)
    for b in range(B):
        n = mask[b].sum()
        packed[b, :n], packed_mask[b, :n] = x[b, mask[b]], True
    out = forward(model, garbage(x, mask), mask)
    ref = forward(model, packed, packed_mask)
    for b in range(B):
        np.testing.assert_array_equal(out.tokens[b][mask[b]],
                                      ref.tokens[b][packed_mask[b]])
    np.testing.assert_allclose(out.pooled, ref.pooled, rtol=1e-6, atol=1e-7)


def test_backward_direction_starts_at_the_last_valid_frame():
    model = make("gru", True, layers=1)
    x = frames(4)
    out = forward(model, garbage(x, MASK), MASK).tokens
    for b, n in enumerate(LENGTHS):  # one backward step from the zero state on x[n-1]
        alone = forward(model, x[b:b + 1, n - 1:n], None).tokens
        np.testing.assert_allclose(out[b, n - 1, H:], alone[0, 0, H:], rtol=1e-6, atol=1e-7)


def test_absent_rows_give_zeros():
    model = make("lstm", True)
    mask = MASK.copy()
    mask[1] = False
    out = forward(model, frames(), mask)
    assert not np.any(out.tokens[1]) and not np.any(out.pooled[1])
    assert out.present.tolist() == [True, False, True, True]
    text = RecurrentTextEncoder(11, embed_dim=4, dim=6, cell="gru", bidirectional=True,
                                rngs=nnx.Rngs(0))
    text.eval()
    ids = np.random.default_rng(0).integers(0, 11, (B, T)).astype(np.int32)
    out = forward(text, ids, mask)
    assert not np.any(out.tokens[1]) and not np.any(out.pooled[1])


def test_text_encoder_ignores_padding_ids_and_matches_embeddings():
    text = RecurrentTextEncoder(11, embed_dim=4, dim=5, cell="lstm", num_layers=2,
                                rngs=nnx.Rngs(1))
    randomize(text)
    text.eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 11, (B, T)).astype(np.int32)
    noisy = np.where(MASK, ids, rng.integers(-10**6, 10**6, (B, T))).astype(np.int32)
    ref = forward(text, ids, MASK)
    out = forward(text, noisy, MASK)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.pooled, ref.pooled)
    emb = text.embeddings(jnp.asarray(ids))
    np.testing.assert_array_equal(forward(text.rnn, emb, MASK).tokens, ref.tokens)


# ------------------------------------------------------------------ training


def test_dropout_between_layers_follows_rngs():
    model = RecurrentEncoder(F, dim=4, num_layers=2, dropout=0.5, rngs=nnx.Rngs(0))
    x, mask = frames(), MASK
    a = forward(model, x, mask, nnx.Rngs(dropout=1)).tokens
    b = forward(model, x, mask, nnx.Rngs(dropout=1)).tokens
    c = forward(model, x, mask, nnx.Rngs(dropout=2)).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Training mode with garbage at padded frames: the same tokens (same key).
    d = forward(model, garbage(x, mask), mask, nnx.Rngs(dropout=1)).tokens
    np.testing.assert_array_equal(a, d)
    model.eval()
    np.testing.assert_array_equal(forward(model, x, mask).tokens,
                                  forward(model, x, mask).tokens)
    assert RecurrentEncoder(F, dim=4, dropout=0.5, rngs=nnx.Rngs(0)).dropout is None


def test_gradients_are_finite_and_ignore_padding():
    model = make("lstm", True, dim=4)

    @nnx.jit
    @nnx.grad
    def grad(m, x, mask):
        out = m(x, mask)
        return jnp.sum(out.pooled ** 2) + jnp.sum(out.tokens ** 2)

    x = frames()
    params = lambda g: jax.tree.leaves(nnx.state(g, nnx.Param))
    clean = params(grad(model, np.where(MASK[..., None], x, 0), MASK))
    assert len(clean) == 2 * 2 * 3 + 2  # (kernel_i, kernel_h, bias) x 2 cells x 2 layers
    assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in clean)
    nan_padded = params(grad(model, np.where(MASK[..., None], x, np.nan), MASK))
    for g, c in zip(nan_padded, clean, strict=True):  # bitwise: padding is never read
        np.testing.assert_array_equal(g, c)


def test_functional_api_in_train_and_eval_mode():
    model = RecurrentEncoder(F, dim=4, num_layers=2, dropout=0.5, bidirectional=True,
                             rngs=nnx.Rngs(0))
    x, mask = jnp.asarray(frames()), jnp.asarray(MASK)
    apply, variables = functional(model)
    reference = nnx.clone(model)
    reference.eval()
    np.testing.assert_allclose(jax.jit(apply)(variables, x, mask).pooled,
                               reference(x, mask).pooled, rtol=1e-5, atol=1e-6)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="key"):
        apply(variables, x, mask, train=True)
    train = jax.jit(lambda v, k: apply(v, x, mask, train=True, key=k).pooled)
    np.testing.assert_array_equal(train(variables, key), train(variables, key))
    assert not np.array_equal(train(variables, key), train(variables, jax.random.key(1)))


def test_fit_a_classifier_with_recurrent_encoders(tmp_path):
    rng = np.random.default_rng(0)
    n = 24
    y = rng.integers(0, 3, n)
    lengths = rng.integers(1, 7, n)
    mask = np.arange(6)[None] < lengths[:, None]
    data = {
        "audio": ((rng.normal(size=(n, 6, 3)) - y[:, None, None]).astype(np.float32), mask),
        "text": (np.where(mask, y[:, None] * 3 + rng.integers(0, 3, (n, 6)), 0)
                 .astype(np.int32), mask),
        "label": y.astype(np.int32),
        "present": {"text": rng.random(n) > 0.25},
    }
    rngs = seed_rngs(0)
    encoders = {"audio": RecurrentEncoder(3, dim=6, cell="gru", bidirectional=True,
                                          rngs=rngs),
                "text": RecurrentTextEncoder(9, embed_dim=4, dim=5, cell="lstm",
                                             num_layers=2, dropout=0.1, rngs=rngs)}
    model = build_classifier(encoders, "concat", num_outputs=3, fusion_dim=6, rngs=rngs)
    fit(model, Classification(3), data, workdir=tmp_path, epochs=6, batch_size=12,
        optimizer=OptimizerConfig(learning_rate=0.05), progress=False)
    epochs = [r for r in read_log(tmp_path / "log.jsonl") if r["kind"] == "epoch"]
    losses = [r["train_loss"] for r in epochs]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


# ------------------------------------------------------------------ bad inputs


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _COMPILES.append(event) if event in _COMPILE_EVENTS
    else None)

X = frames()
IDS = np.ones((B, T), np.int32)
BAD_INPUTS = [
    ("frames", lambda m, t: m(X[0], MASK[0]), ValueError, r"frames: expected rank 3"),
    ("frames", lambda m, t: m(X.astype(np.int32), MASK), TypeError,
     r"frames: expected a floating-point array with shape \[batch, time, features=5\]"),
    ("frames", lambda m, t: m(X[..., :4], MASK), ValueError,
     r"frames: expected shape \[batch=4, time=7, features=5\], got \(4, 7, 4\)"),
    ("frames", lambda m, t: m(X[:, :0], MASK[:, :0]), ValueError,
     r"frames: axis 'time' is empty"),
    ("frames", lambda m, t: m(X.tolist(), MASK), TypeError, r"frames: expected an array"),
    ("mask", lambda m, t: m(X, MASK[:, :5]), ValueError,
     r"mask: expected shape \[batch=4, time=7\], got \(4, 5\)"),
    ("mask", lambda m, t: m(X, MASK[0]), ValueError, r"mask: expected rank 2"),
    ("mask", lambda m, t: m(X, MASK.astype(np.float32)), TypeError, r"mask: expected bool"),
    ("token_ids", lambda m, t: t(IDS.astype(np.float32), MASK), TypeError,
     r"token_ids: expected an integer dtype"),
    ("token_ids", lambda m, t: t(IDS[..., None], MASK), ValueError,
     r"token_ids: expected rank 2"),
    ("token_ids", lambda m, t: t(np.full((B, T), 11, np.int32), MASK), ValueError,
     r"token_ids: ids must lie in \[0, 11\) at valid positions"),
    ("mask", lambda m, t: t(IDS, MASK[:2]), ValueError, r"mask: expected shape \[batch=4"),
    ("mask", lambda m, t: t(IDS, None), TypeError, r"mask: expected an array"),
]


@pytest.fixture(scope="module")
def bad_input_models():
    frames_model = RecurrentEncoder(F, dim=4, rngs=nnx.Rngs(0))
    text_model = RecurrentTextEncoder(11, embed_dim=4, dim=4, rngs=nnx.Rngs(0))
    return frames_model, text_model


@pytest.mark.parametrize(("argument", "call", "error", "match"), BAD_INPUTS,
                         ids=[f"{i}-{case[0]}" for i, case in enumerate(BAD_INPUTS)])
def test_bad_inputs_are_rejected_before_compiling(bad_input_models, argument, call, error,
                                                  match):
    del argument
    jax.clear_caches()
    _COMPILES.clear()
    with pytest.raises(error, match=match):
        call(*bad_input_models)
    assert _COMPILES == []


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"cell": "rnn"}, r"cell: expected one of \['gru', 'lstm'\], got 'rnn'"),
    ({"num_layers": 0}, r"num_layers: expected a positive integer"),
    ({"hidden_size": 2.5}, r"hidden_size: expected a positive integer"),
    ({"dropout": 1.0}, r"dropout: expected a rate in \[0, 1\)"),
    ({"dim": 0}, r"dim: expected a positive integer"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecurrentEncoder(F, **{"dim": 4, **kwargs}, rngs=nnx.Rngs(0))


def test_docstring_examples_run():
    results = doctest.testmod(recurrent, optionflags=doctest.ELLIPSIS, verbose=False)
    assert results.attempted > 0 and results.failed == 0


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_bfloat16_compute_keeps_float32_outputs(cell):
    model = make(cell, True)
    low = make(cell, True, dtype=jnp.bfloat16)  # same seed: the same float32 parameters
    want = forward(model, frames(), MASK)
    got = forward(low, frames(), MASK)
    assert got.tokens.dtype == got.pooled.dtype == jnp.float32
    np.testing.assert_allclose(got.tokens, want.tokens, atol=5e-2)
