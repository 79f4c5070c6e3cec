"""The contract every registered fusion layer must honour (lepton_mm.fusion.base).

Each test runs over all of ``FUSIONS``, so a new layer is checked the moment it registers.
Method-specific behaviour lives in test_fusion_classic.py / test_fusion_transformers.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lepton_mm import EncoderOutput
from lepton_mm.fusion import FUSIONS, build

DIMS3 = {"text": 5, "audio": 6, "image": 8}
LENGTHS = {"audio": 5, "image": 3, "text": 4}
OUT = 4
BATCH = 3


def _dims(name):
    cls = FUSIONS[name]
    if cls.max_modalities is not None and cls.max_modalities < 3:
        return {"audio": 6, "image": 8}
    return dict(DIMS3)


def _inputs(dims, seed=0, batch=BATCH):
    rng = np.random.default_rng(seed)
    out = {}
    for m, d in dims.items():
        t = LENGTHS[m]
        tokens = rng.normal(size=(batch, t, d)).astype(np.float32)
        mask = np.ones((batch, t), bool)
        mask[:, t - 1] = np.arange(batch) % 2 == 0  # some padding
        out[m] = EncoderOutput.from_tokens(jnp.asarray(tokens), jnp.asarray(mask))
    return out


def _with_absent(inputs, modality, example, fill=np.nan):
    """Marks `modality` absent for `example` and fills its values with `fill`."""
    x = inputs[modality]
    tokens = x.tokens.at[example].set(fill)
    pooled = x.pooled.at[example].set(fill)
    mask = x.mask.at[example].set(False)
    return {**inputs, modality: EncoderOutput(tokens, mask, pooled)}


# Small transformer settings: the contract is about behaviour, not capacity, and the
# defaults' backward passes take tens of seconds to compile on a 2-core CPU.
SMALL = {
    "cross_attention": {"width": 8, "num_layers": 1},
    "bottleneck": {"width": 8, "num_layers": 2},
    "early_transformer": {"width": 8, "num_layers": 1},
}


def _layer(name, dims=None, seed=0):
    layer = build(name, dims or _dims(name), OUT, rngs=nnx.Rngs(seed), **SMALL.get(name, {}))
    layer.eval()
    return layer


NAMES = sorted(FUSIONS)


def test_registry_lists_every_method_of_the_zoo():
    expected = {"concat", "late", "early_transformer", "tensor", "low_rank", "multiplicative",
                "gated", "film", "attention", "cross_attention", "bottleneck"}
    assert expected <= set(FUSIONS)
    for name, cls in FUSIONS.items():
        assert cls.name == name
        assert cls.__doc__ and ("References" in cls.__doc__ or "et al" in cls.__doc__)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="Known fusions: .*concat"):
        build("mystery", DIMS3, OUT, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_jit_and_finite_grads(name):
    dims = _dims(name)
    if name == "cross_attention":
        # MulT has M(M-1) cross branches; its 3-modality backward pass takes over a minute
        # to compile on a 2-core CPU. Two modalities exercise the same code.
        dims = {"audio": 6, "image": 8}
    layer = _layer(name, dims)
    inputs = _inputs(dims)
    out = layer(inputs)
    assert out.shape == (BATCH, OUT) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    jitted = nnx.jit(lambda m, x: m(x))(layer, inputs)
    np.testing.assert_allclose(jitted, out, rtol=1e-5, atol=1e-5)

    layer.train()
    grads = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) ** 2)))(layer, inputs)
    leaves = jax.tree.leaves(grads)
    assert leaves, f"{name} has no parameters"
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.isfinite(np.asarray(g)).all(), f"{name}: non-finite grad at {path}"
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)


@pytest.mark.parametrize("name", NAMES)
def test_absent_modality_values_do_not_matter(name):
    dims = _dims(name)
    layer = _layer(name, dims)
    inputs = _inputs(dims)
    for modality in sorted(dims):
        base = _with_absent(inputs, modality, example=1, fill=0.0)
        poisoned = _with_absent(inputs, modality, example=1, fill=np.nan)
        big = _with_absent(inputs, modality, example=1, fill=1e6)
        a, b, c = layer(base), layer(poisoned), layer(big)
        assert np.isfinite(np.asarray(b)).all(), f"{name}: NaN leaked from absent {modality}"
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=f"{name}/{modality}")
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5, err_msg=f"{name}/{modality}")


@pytest.mark.parametrize("name", NAMES)
def test_all_modalities_absent_gives_finite_output(name):
    dims = _dims(name)
    inputs = _inputs(dims)
    for modality in dims:
        inputs = _with_absent(inputs, modality, example=0)
    out = _layer(name, dims)(inputs)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("name", NAMES)
def test_batch_independence_in_eval_mode(name):
    dims = _dims(name)
    layer = _layer(name, dims)
    a = _inputs(dims, seed=0)
    b = _inputs(dims, seed=1)
    mixed = {m: EncoderOutput(*(jnp.concatenate([xa[:1], xb[1:]])
                                for xa, xb in zip(a[m], b[m], strict=True)))
             for m in dims}
    np.testing.assert_allclose(layer(mixed)[0], layer(a)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_dict_order_does_not_matter(name):
    dims = _dims(name)
    forward = _layer(name, dict(sorted(dims.items())))
    backward = _layer(name, dict(sorted(dims.items(), reverse=True)))
    pf, pb = nnx.state(forward, nnx.Param), nnx.state(backward, nnx.Param)
    assert jax.tree.structure(pf) == jax.tree.structure(pb)
    for x, y in zip(jax.tree.leaves(pf), jax.tree.leaves(pb), strict=True):
        np.testing.assert_array_equal(x, y)
    inputs = _inputs(dims)
    reordered = dict(sorted(inputs.items(), reverse=True))
    np.testing.assert_allclose(forward(inputs), backward(reordered), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_name_the_modality(name):
    dims = _dims(name)
    layer = _layer(name, dims)
    inputs = _inputs(dims)
    first = sorted(dims)[0]
    last = sorted(dims)[-1]

    with pytest.raises(ValueError, match=f"missing modality '{first}'"):
        layer({m: x for m, x in inputs.items() if m != first})
    with pytest.raises(ValueError, match="unexpected modality 'video'"):
        layer({**inputs, "video": inputs[first]})
    x = inputs[last]
    with pytest.raises(ValueError, match=rf"inputs\['{last}'\]\.tokens.*batch=3"):
        layer({**inputs, last: EncoderOutput.from_tokens(x.tokens[:2], x.mask[:2])})
    wrong_dim = EncoderOutput.from_tokens(jnp.ones((BATCH, 2, dims[first] + 1)))
    with pytest.raises(ValueError, match=rf"inputs\['{first}'\]\.tokens.*dim={dims[first]}"):
        layer({**inputs, first: wrong_dim})
    with pytest.raises(ValueError, match=rf"inputs\['{first}'\]\.mask"):
        layer({**inputs, first: inputs[first]._replace(mask=inputs[first].mask[:, :-1])})
    with pytest.raises(TypeError, match=rf"inputs\['{first}'\]"):
        layer({**inputs, first: inputs[first].tokens})


@pytest.mark.parametrize("name", NAMES)
def test_modality_count_limits(name):
    cls = FUSIONS[name]
    with pytest.raises(ValueError, match="at least 2 modalities"):
        build(name, {"audio": 4}, OUT, rngs=nnx.Rngs(0))
    if cls.max_modalities is not None and cls.max_modalities < 3:
        with pytest.raises(ValueError, match=f"at most {cls.max_modalities} modalities"):
            build(name, DIMS3, OUT, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", NAMES)
def test_graph_is_hashable_so_jit_caches(name):
    # A static module graph must hash, or every jax.jit over (graphdef, state) recompiles.
    layer = _layer(name)
    graphdef, _ = nnx.split(layer)
    assert hash(graphdef) == hash(nnx.split(_layer(name))[0])
