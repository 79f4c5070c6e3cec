"""lepton_mm.functional: every encoder, fusion layer and a model, called from plain JAX
(jax.grad, jax.jit, jax.vmap) and from Linen, in train and eval mode, with and without a
dropout key. References: the NNX module's own forward pass and ``nnx.grad``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lepton_mm import EncoderOutput
from lepton_mm.encoders import (
    AudioSpectrogramCNN,
    ImageCNN,
    RecurrentEncoder,
    RecurrentTextEncoder,
    TextTransformer,
)
from lepton_mm.functional import functional, to_linen
from lepton_mm.fusion import FUSIONS, build
from lepton_mm.models import MultimodalClassifier

DIMS = {"audio": 6, "image": 5}
# Small settings with dropout wherever a layer has it (the matrix is about behaviour).
SMALL = {
    "cross_attention": {"width": 8, "num_layers": 1},
    "bottleneck": {"width": 8, "num_layers": 2},
    "early_transformer": {"width": 8, "num_layers": 1},
    "concat": {"hidden": (6,), "dropout": 0.5},
    "late": {"dropout": 0.5},
    "tensor": {"dropout": 0.5},
}


def _fusion_inputs(seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for i, (m, d) in enumerate(sorted(DIMS.items())):
        mask = np.ones((3, 4), bool)
        mask[1, 3 - i:] = False
        out[m] = EncoderOutput.from_tokens(
            jnp.asarray(rng.normal(size=(3, 4, d)), jnp.float32), jnp.asarray(mask))
    return out


def _factory(name):
    """``(builder taking rngs=, its inputs as (args, kwargs))``."""
    rng = np.random.default_rng(1)
    if name in FUSIONS:
        return (lambda rngs: build(name, DIMS, 4, rngs=rngs, **SMALL.get(name, {})),
                ((_fusion_inputs(),), {}))
    if name == "image_cnn":
        return (lambda rngs: ImageCNN(1, dim=6, widths=(4, 4), dropout=0.5, rngs=rngs),
                ((jnp.asarray(rng.normal(size=(3, 8, 8, 1)), jnp.float32),), {}))
    if name == "audio_cnn":
        mask = np.arange(12)[None] < np.array([[12], [7], [3]])
        return (lambda rngs: AudioSpectrogramCNN(5, dim=6, widths=(4,), dropout=0.5,
                                                 rngs=rngs),
                ((jnp.asarray(rng.normal(size=(3, 12, 5)), jnp.float32),
                  jnp.asarray(mask)), {}))
    if name == "text_transformer":
        ids = jnp.asarray(rng.integers(1, 30, (3, 6)), jnp.int32)
        mask = jnp.asarray(np.arange(6)[None] < np.array([[6], [4], [2]]))
        return (lambda rngs: TextTransformer(30, dim=8, num_layers=1, num_heads=2, mlp_dim=8,
                                             max_len=8, rngs=rngs),
                ((ids, mask), {}))
    if name == "recurrent":
        mask = np.arange(12)[None] < np.array([[12], [7], [3]])
        return (lambda rngs: RecurrentEncoder(5, dim=6, num_layers=2, bidirectional=True,
                                              dropout=0.5, rngs=rngs),
                ((jnp.asarray(rng.normal(size=(3, 12, 5)), jnp.float32),
                  jnp.asarray(mask)), {}))
    if name == "recurrent_text":
        ids = jnp.asarray(rng.integers(1, 30, (3, 6)), jnp.int32)
        mask = jnp.asarray(np.arange(6)[None] < np.array([[6], [4], [2]]))
        return (lambda rngs: RecurrentTextEncoder(30, embed_dim=8, dim=8, cell="lstm",
                                                  num_layers=2, dropout=0.5, rngs=rngs),
                ((ids, mask), {}))
    assert name == "classifier"
    batch = {"image": jnp.asarray(rng.normal(size=(3, 8, 8, 1)), jnp.float32),
             "audio": (jnp.asarray(rng.normal(size=(3, 12, 5)), jnp.float32),
                       jnp.asarray(np.arange(12)[None] < np.array([[12], [7], [3]])))}
    return (lambda rngs: MultimodalClassifier(
        {"image": ImageCNN(1, dim=5, widths=(4,), rngs=rngs),
         "audio": AudioSpectrogramCNN(5, dim=6, widths=(4,), rngs=rngs)},
        build("concat", DIMS, 6, hidden=(6,), dropout=0.5, rngs=rngs),
        nnx.Linear(6, 3, rngs=rngs)), ((batch,), {}))


CASES = [*sorted(FUSIONS), "image_cnn", "audio_cnn", "text_transformer", "recurrent",
         "recurrent_text", "classifier"]


def _out(y):
    """A layer's output as one array (encoders return an EncoderOutput)."""
    return y.pooled if isinstance(y, EncoderOutput) else y


def _has_dropout(module):
    return any(isinstance(m, nnx.Dropout) and m.rate > 0 for _, m in nnx.iter_modules(module))


def _has_stats(module):
    return bool(jax.tree.leaves(nnx.state(module, nnx.BatchStat)))


@pytest.mark.parametrize("name", CASES)
def test_plain_jax_matrix(name):
    make, (args, kwargs) = _factory(name)
    module = make(nnx.Rngs(0))
    dropout, stats = _has_dropout(module), _has_stats(module)
    apply, variables = functional(module)
    # Eval mode: the module's own eval-mode forward pass, bit for bit; no key needed.
    reference = nnx.clone(module)
    reference.eval()
    expected = _out(reference(*args, **kwargs))
    np.testing.assert_array_equal(_out(apply(variables, *args, **kwargs)), expected)
    np.testing.assert_allclose(  # compiled: XLA may fuse differently (float rounding)
        _out(jax.jit(lambda v: apply(v, *args, **kwargs))(variables)), expected,
        rtol=1e-5, atol=1e-6)

    # Eval-mode gradients under jax.grad and jax.jit(jax.grad) equal nnx.grad's.
    def loss(params):
        return jnp.sum(_out(apply({**variables, "params": params}, *args, **kwargs)) ** 2)

    # (nnx.grad under nnx.jit: eagerly, a transformer's gradient costs a compilation
    # per primitive, ~3x the jitted reference's time)
    want = nnx.jit(nnx.grad(lambda m: jnp.sum(_out(m(*args, **kwargs)) ** 2)))(reference)
    got = jax.jit(jax.grad(loss))(variables["params"])
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(nnx.state(want, nnx.Param)),
                    strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)

    # Train mode: a missing key is a clear error where there is dropout; the same key
    # gives the same output, another key another; it differentiates and vmaps.
    def train(v, key):
        out = apply(v, *args, train=True, key=key, mutable=stats, **kwargs)
        return (_out(out[0]), out[1]) if stats else (_out(out), v)

    if dropout:
        with pytest.raises(ValueError, match="key: .* dropout key"):
            apply(variables, *args, train=True, mutable=stats, **kwargs)
    if stats:
        with pytest.raises(ValueError, match="mutable=True"):
            apply(variables, *args, train=True, key=jax.random.key(1), **kwargs)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    jit_train = jax.jit(train)
    y1, new = jit_train(variables, k1)
    np.testing.assert_array_equal(jit_train(variables, k1)[0], y1)
    assert (not np.array_equal(jit_train(variables, k2)[0], y1)) == (dropout or False)
    if dropout or stats:  # dropout masks or batch statistics: not the eval output
        assert not np.allclose(y1, expected)
    if stats:  # the running statistics moved; the caller's module did not change
        assert not all(np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(new["batch_stats"]), jax.tree.leaves(variables["batch_stats"]),
            strict=True))
        np.testing.assert_array_equal(_out(apply(variables, *args, **kwargs)), expected)
    grads = jax.jit(jax.grad(lambda p, k: jnp.sum(train({**variables, "params": p}, k)[0])))(
        variables["params"], k1)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    batched = jax.jit(jax.vmap(lambda k: train(variables, k)[0]))(jnp.stack([k1, k2]))
    np.testing.assert_allclose(batched[0], y1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_linen_matrix(name):
    make, (args, kwargs) = _factory(name)
    layer = to_linen(make)
    init = layer.init({"params": jax.random.key(0)}, *args, **kwargs)
    probe = make(nnx.Rngs(0))
    dropout, stats = _has_dropout(probe), _has_stats(probe)
    # Eval mode (the default): deterministic, no rng, and the same function as the NNX
    # module holding Linen's parameters.
    y = _out(layer.apply(init, *args, **kwargs))
    np.testing.assert_array_equal(_out(layer.apply(init, *args, **kwargs)), y)
    nnx.update(probe, nnx.State.merge(*[
        _with_pure(nnx.state(probe, kind), init[col]["nnx"])
        for kind, col in ((nnx.Param, "params"), (nnx.BatchStat, "batch_stats"))
        if col in init]))
    probe.eval()
    np.testing.assert_allclose(y, _out(probe(*args, **kwargs)), rtol=1e-6, atol=1e-6)
    # Train mode: dropout needs a key (a clear error, never a fixed mask); batch norm
    # needs mutable batch_stats; keys change the masks.
    mutable = ["batch_stats"] if stats else False
    if dropout:
        with pytest.raises(ValueError, match="rngs=\\{'dropout': key\\}"):
            layer.apply(init, *args, train=True, mutable=mutable, **kwargs)
    if stats:
        with pytest.raises(ValueError, match="mutable=\\['batch_stats'\\]"):
            layer.apply(init, *args, train=True, rngs={"dropout": jax.random.key(1)},
                        **kwargs)

    def train(key):
        out = layer.apply(init, *args, train=True, rngs={"dropout": key}, mutable=mutable,
                          **kwargs)
        return _out(out[0] if stats else out)

    t1, t2 = train(jax.random.key(1)), train(jax.random.key(2))
    np.testing.assert_array_equal(train(jax.random.key(1)), t1)
    assert (not np.array_equal(t1, t2)) == dropout
    grads = jax.grad(lambda p: jnp.sum(_out(
        layer.apply({**init, "params": p}, *args, train=True,
                    rngs={"dropout": jax.random.key(1)}, mutable=mutable, **kwargs)[0]
        if stats else layer.apply({**init, "params": p}, *args, train=True,
                                  rngs={"dropout": jax.random.key(1)}, **kwargs))))(
        init["params"])
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def _with_pure(state, pure):
    nnx.replace_by_pure_dict(state, pure)
    return state


def test_bad_arguments():
    layer = build("concat", DIMS, 4, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="module: expected a flax.nnx.Module"):
        functional(lambda x: x)
    with pytest.raises(ValueError, match="method: ConcatFusion has no method 'nope'"):
        functional(layer, method="nope")
    apply, variables = functional(layer)
    with pytest.raises(ValueError, match="variables: expected the dict"):
        apply(variables["params"], _fusion_inputs())
    with pytest.raises(TypeError, match="train: expected True or False"):
        apply(variables, _fusion_inputs(), train="yes")
