"""Chunked, multi-device CLIP and SigLIP losses: a ring over the data axis.

With the global batch ``B`` sharded over ``n`` devices (``b = B/n`` rows each), the
dense losses need the full ``[B, B]`` similarity matrix. Here no device ever holds more
than one ``[b, b]`` block or more than two ``[b, dim]`` embedding blocks:

* Each device keeps its own ``za`` block and passes its ``zb`` block around the ring
  with ``jax.lax.ppermute`` (``n − 1`` hops). At each hop it computes the ``[b, b]``
  logits of its ``za`` rows against the visiting ``zb`` block.
* SigLIP (the chunked scheme of Zhai et al. / big_vision): every block contributes
  its log-sigmoid terms to a running sum; positives only occur on the first (home)
  block.
* CLIP: each device accumulates an online (streaming) log-sum-exp for its rows. The
  column log-sum-exp of a ``zb`` block needs *all* ``za`` blocks, which is exactly the
  set of devices that block visits, so the column accumulators travel with the block
  and arrive home (one last hop, ``2b`` floats) complete. One matmul per block, for
  both directions.
* The backward pass is a second ring (a ``jax.custom_vjp``): it recomputes each block,
  accumulates ``∂/∂za`` locally and lets ``∂/∂zb`` travel with its block back home, so
  the backward is as memory-light as the forward (autodiff through the loop would
  keep every visiting block and every ``[b, b]`` logit block).

The results equal ``clip_loss``/``sigmoid_loss`` (values and gradients, to float32
rounding) on the same global arrays. Call them inside or outside ``jax.jit``; the global
batch must be divisible by the size of the mesh axis (pad and pass ``mask``). Meshes
with ``Auto`` or ``Explicit`` axes both work; as everywhere in JAX, differentiating on
an ``Explicit`` mesh needs ``jax.jit`` or ``jax.set_mesh(mesh)`` around the call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lepton_mm.alignment.losses import (
    _NEG,
    _check_pair,
    _check_scalar,
    _mm,
    _normalize_valid,
    _scalar,
    _valid,
)

Array = jax.Array

_TINY = float(jnp.finfo(jnp.float32).tiny)


def _ring(step: Callable, carry: Any, blocks: Any, accums: Any, *, n: int,
          axis_name: str) -> tuple[Any, Any]:
    """Visits every device's ``blocks`` once, starting with the local one.

    ``step(hop, carry, blocks, accums) -> (carry, accums)`` is called ``n`` times;
    ``hop`` (0 = the local block) is an int32 scalar. ``carry`` stays on the device;
    ``blocks`` (read-only) and ``accums`` (updated by ``step``) move one device
    forward after each call. After the last call only ``accums`` make the final hop, so
    every device gets back the accumulators of its own block, updated by all devices.
    """
    perm = [(i, (i + 1) % n) for i in range(n)]
    shift = lambda tree: jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, perm), tree)

    def body(state, hop):
        carry, blocks, accums = state
        carry, accums = step(hop, carry, blocks, accums)
        return (carry, shift(blocks), shift(accums)), None

    if n > 1:
        hops = jnp.arange(n - 1, dtype=jnp.int32)
        (carry, blocks, accums), _ = jax.lax.scan(body, (carry, blocks, accums), hops)
    carry, accums = step(jnp.int32(n - 1), carry, blocks, accums)
    return carry, shift(accums)


def _lse_update(peak: Array, total: Array, logits: Array, valid: Array,
                axis: int) -> tuple[Array, Array]:
    """One streaming log-sum-exp step over ``axis``, counting entries where ``valid``."""
    x = jnp.where(valid, logits, _NEG)
    new_peak = jnp.maximum(peak, jnp.max(x, axis=axis))
    shifted = x - jnp.expand_dims(new_peak, axis)
    total = total * jnp.exp(peak - new_peak) + jnp.sum(
        jnp.where(valid, jnp.exp(shifted), 0.0), axis=axis)
    return new_peak, total


def _lse_finish(peak: Array, total: Array) -> Array:
    return peak + jnp.log(jnp.maximum(total, _TINY))


# ----------------------------------------------------------------------------- CLIP


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _clip_ring(a: Array, b: Array, t: Array, valid: Array, axis_name: str,
               n: int) -> Array:
    """Per-device Σ over valid local examples of (row loss + column loss), unnormalised."""
    return _clip_ring_fwd(a, b, t, valid, axis_name, n)[0]


def _clip_ring_fwd(a, b, t, valid, axis_name, n):
    def step(hop, row_stats, blocks, col_stats):
        b_k, valid_k = blocks
        logits = t * _mm(a, b_k.T)  # [b_local, b_k]
        row_stats = _lse_update(*row_stats, logits, valid_k[None, :], axis=1)
        col_stats = _lse_update(*col_stats, logits, valid[:, None], axis=0)
        return row_stats, col_stats

    start = jnp.full_like(valid, _NEG, dtype=jnp.float32), jnp.zeros_like(
        valid, dtype=jnp.float32)
    row_stats, col_stats = _ring(step, start, (b, valid), start, n=n, axis_name=axis_name)
    lse_rows, lse_cols = _lse_finish(*row_stats), _lse_finish(*col_stats)
    positive = t * jnp.sum(a * b, axis=-1)
    total = jnp.sum(jnp.where(valid, lse_rows + lse_cols - 2.0 * positive, 0.0))
    return total, (a, b, t, valid, lse_rows, lse_cols)


def _clip_ring_bwd(axis_name, n, residuals, g):
    a, b, t, valid, lse_rows, lse_cols = residuals

    def step(hop, carry, blocks, accums):
        da, dt = carry
        b_k, valid_k, lse_cols_k = blocks
        (db_k,) = accums
        sims = _mm(a, b_k.T)
        logits = t * sims
        pairs = valid[:, None] & valid_k[None, :]
        # ∂/∂logits of Σ_valid (lse_row + lse_col): row softmax + column softmax.
        probs = (jnp.exp(jnp.where(pairs, logits - lse_rows[:, None], _NEG))
                 + jnp.exp(jnp.where(pairs, logits - lse_cols_k[None, :], _NEG)))
        dlogits = g * jnp.where(pairs, probs, 0.0)
        return (da + t * _mm(dlogits, b_k), dt + jnp.sum(dlogits * sims)), (
            db_k + t * _mm(dlogits.T, a),)

    zero = jnp.zeros_like(t)
    (da, dt), (db,) = _ring(step, (jnp.zeros_like(a), zero), (b, valid, lse_cols),
                            (jnp.zeros_like(b),), n=n, axis_name=axis_name)
    # The positives' term, −2·t·<a_i, b_i> per valid example, is local.
    weight = jnp.where(valid, -2.0 * g, 0.0)[:, None]
    da = da + t * weight * b
    db = db + t * weight * a
    dt = dt + jnp.sum(weight * a * b)
    return da, db, dt, None


_clip_ring.defvjp(_clip_ring_fwd, _clip_ring_bwd)


# ---------------------------------------------------------------------------- SigLIP


def _signs(hop: Array, rows: int, cols: int) -> Array:
    """+1 on the diagonal of the home block (hop 0), −1 everywhere else."""
    eye = jnp.eye(rows, cols, dtype=bool) & (hop == 0)
    return jnp.where(eye, 1.0, -1.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _sigmoid_ring(a: Array, b: Array, t: Array, bias: Array, valid: Array,
                  axis_name: str, n: int) -> Array:
    """Per-device −Σ log σ(z·logit) over this device's rows and every valid column."""
    return _sigmoid_ring_fwd(a, b, t, bias, valid, axis_name, n)[0]


def _sigmoid_ring_fwd(a, b, t, bias, valid, axis_name, n):
    def step(hop, total, blocks, accums):
        b_k, valid_k = blocks
        logits = t * _mm(a, b_k.T) + bias
        loglik = jax.nn.log_sigmoid(_signs(hop, *logits.shape) * logits)
        pairs = valid[:, None] & valid_k[None, :]
        return total - jnp.sum(jnp.where(pairs, loglik, 0.0)), accums

    total, _ = _ring(step, jnp.zeros_like(t), (b, valid), (), n=n, axis_name=axis_name)
    return total, (a, b, t, bias, valid)


def _sigmoid_ring_bwd(axis_name, n, residuals, g):
    a, b, t, bias, valid = residuals

    def step(hop, carry, blocks, accums):
        da, dt, dbias = carry
        b_k, valid_k = blocks
        (db_k,) = accums
        sims = _mm(a, b_k.T)
        signs = _signs(hop, *sims.shape)
        # d/dx −log σ(z x) = −z σ(−z x).
        grad = -signs * jax.nn.sigmoid(-signs * (t * sims + bias))
        dlogits = g * jnp.where(valid[:, None] & valid_k[None, :], grad, 0.0)
        carry = (da + t * _mm(dlogits, b_k), dt + jnp.sum(dlogits * sims),
                 dbias + jnp.sum(dlogits))
        return carry, (db_k + t * _mm(dlogits.T, a),)

    zero = jnp.zeros_like(t)
    (da, dt, dbias), (db,) = _ring(step, (jnp.zeros_like(a), zero, zero), (b, valid),
                                   (jnp.zeros_like(b),), n=n, axis_name=axis_name)
    return da, db, dt, dbias, None


_sigmoid_ring.defvjp(_sigmoid_ring_fwd, _sigmoid_ring_bwd)


# ------------------------------------------------------------------------ Public API


def _check_mesh(mesh: Any, axis_name: Any, batch: int) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if not isinstance(axis_name, str) or axis_name not in mesh.axis_names:
        raise ValueError(
            f"axis_name: expected one of the mesh axes {mesh.axis_names}, got {axis_name!r}.")
    n = mesh.shape[axis_name]
    if batch % n:
        raise ValueError(
            f"za: the global batch ({batch}) must be divisible by the {n} devices on mesh "
            f"axis {axis_name!r}; pad it and pass `mask` to exclude the padding.")


def _place(mesh: Mesh, specs: tuple, *args: Array) -> tuple:
    """Lays ``args`` out as ``specs`` on an Explicit-axes mesh (``jax.make_mesh``'s default),
    where ``shard_map`` requires it; on Auto meshes ``shard_map`` reshards by itself."""
    if AxisType.Explicit not in mesh.axis_types:
        return args
    return tuple(jax.reshard(x, NamedSharding(mesh, s)) for x, s in zip(args, specs, strict=True))


def _count(valid: Array, axis_name: str) -> Array:
    return jnp.maximum(jax.lax.psum(jnp.sum(valid, dtype=jnp.float32), axis_name), 1.0)


# Jitted (static mesh and axis) so that eager calls compile once instead of dispatching
# the ring op by op; inside a caller's jit they are simply inlined.
@functools.partial(jax.jit, static_argnames=("mesh", "axis_name"))
def _clip_sharded(za, zb, t, valid, *, mesh, axis_name):
    n = mesh.shape[axis_name]

    def local(za, zb, t, valid):
        a, b = _normalize_valid(za, valid), _normalize_valid(zb, valid)
        t = jax.lax.pcast(t, axis_name, to="varying")
        total = _clip_ring(a, b, t, valid, axis_name, n)
        return 0.5 * jax.lax.psum(total, axis_name) / _count(valid, axis_name)

    data, rep = PartitionSpec(axis_name), PartitionSpec()
    specs = (data, data, rep, data)
    fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=rep)
    return fn(*_place(mesh, specs, za, zb, t, valid))


@functools.partial(jax.jit, static_argnames=("mesh", "axis_name"))
def _sigmoid_sharded(za, zb, t, bias, valid, *, mesh, axis_name):
    n = mesh.shape[axis_name]

    def local(za, zb, t, bias, valid):
        a, b = _normalize_valid(za, valid), _normalize_valid(zb, valid)
        t, bias = jax.lax.pcast((t, bias), axis_name, to="varying")
        total = _sigmoid_ring(a, b, t, bias, valid, axis_name, n)
        return jax.lax.psum(total, axis_name) / _count(valid, axis_name)

    data, rep = PartitionSpec(axis_name), PartitionSpec()
    specs = (data, data, rep, rep, data)
    fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=rep)
    return fn(*_place(mesh, specs, za, zb, t, bias, valid))


def clip_loss_sharded(za: Array, zb: Array, *, logit_scale: Array | float, mesh: Mesh,
                      mask: Array | None = None, axis_name: str = "data") -> Array:
    """``clip_loss`` with the batch sharded over a mesh axis, computed on a ring.

    Same value and gradients as ``clip_loss(za, zb, logit_scale=..., mask=...)`` on the
    global arrays, but no device materialises more than a ``[B/n, B/n]`` block of the
    similarity matrix: ``zb`` blocks travel around the ring (``jax.lax.ppermute``) while
    each device streams the row log-sum-exp of its ``za`` block, and the column
    log-sum-exp of each ``zb`` block travels with it. See the module docstring.

    Args:
      za: float ``[batch, dim]``, global array (any sharding; it is laid out as
        ``PartitionSpec(axis_name)`` for the computation).
      zb: float ``[batch, dim]``, paired row-wise with ``za``.
      logit_scale: float scalar ``t``, the multiplier of the cosine similarities (not its
        log); replicated.
      mesh: the device mesh; ``batch`` must be divisible by ``mesh.shape[axis_name]``.
        Other mesh axes, if any, see replicated data.
      mask: optional bool ``[batch]``, True for real pairs (see ``clip_loss``).
      axis_name: the mesh axis the batch is sharded over.

    Returns:
      float32 scalar, replicated.

    Raises:
      TypeError: bad array types, or ``mesh`` is not a ``jax.sharding.Mesh``.
      ValueError: shape mismatches (as in ``clip_loss``), an unknown ``axis_name``, or a
        batch not divisible by the axis size.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from lepton_mm.alignment import clip_loss
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> za = jax.random.normal(jax.random.key(0), (8, 4))
      >>> zb = jax.random.normal(jax.random.key(1), (8, 4))
      >>> ring = clip_loss_sharded(za, zb, logit_scale=10.0, mesh=mesh)
      >>> bool(jnp.allclose(ring, clip_loss(za, zb, logit_scale=10.0), atol=1e-5))
      True
    """
    batch = _check_pair(za, zb, mask)
    _check_scalar("logit_scale", logit_scale)
    _check_mesh(mesh, axis_name, batch)
    return _clip_sharded(za, zb, _scalar(logit_scale), _valid(mask, batch), mesh=mesh,
                         axis_name=axis_name)


def sigmoid_loss_sharded(za: Array, zb: Array, *, logit_scale: Array | float,
                         logit_bias: Array | float, mesh: Mesh, mask: Array | None = None,
                         axis_name: str = "data") -> Array:
    """``sigmoid_loss`` with the batch sharded over a mesh axis, chunked on a ring.

    The chunked SigLIP scheme (Zhai et al. 2023, Fig. 1): each device computes the
    sigmoid terms of its ``za`` block against its own ``zb`` block (positives and
    negatives), then against each neighbour's ``zb`` block as it arrives over
    ``jax.lax.ppermute`` (negatives only), and the per-device sums are ``psum``-ed.
    Same value and gradients as ``sigmoid_loss`` on the global arrays.

    Args:
      za: float ``[batch, dim]``, global array.
      zb: float ``[batch, dim]``, paired row-wise with ``za``.
      logit_scale: float scalar ``t`` (the multiplier, not its log); replicated.
      logit_bias: float scalar ``b``; replicated.
      mesh: the device mesh; ``batch`` must be divisible by ``mesh.shape[axis_name]``.
      mask: optional bool ``[batch]``, True for real pairs (see ``sigmoid_loss``).
      axis_name: the mesh axis the batch is sharded over.

    Returns:
      float32 scalar, replicated.

    Raises:
      TypeError: bad array types, or ``mesh`` is not a ``jax.sharding.Mesh``.
      ValueError: shape mismatches, an unknown ``axis_name``, or a batch not divisible
        by the axis size.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from lepton_mm.alignment import sigmoid_loss
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> za = jax.random.normal(jax.random.key(0), (8, 4))
      >>> zb = jax.random.normal(jax.random.key(1), (8, 4))
      >>> kw = dict(logit_scale=10.0, logit_bias=-10.0)
      >>> ring = sigmoid_loss_sharded(za, zb, mesh=mesh, **kw)
      >>> bool(jnp.allclose(ring, sigmoid_loss(za, zb, **kw), atol=1e-5))
      True

    References:
      Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023.
      https://arxiv.org/abs/2303.15343
    """
    batch = _check_pair(za, zb, mask)
    _check_scalar("logit_scale", logit_scale)
    _check_scalar("logit_bias", logit_bias)
    _check_mesh(mesh, axis_name, batch)
    return _sigmoid_sharded(za, zb, _scalar(logit_scale), _scalar(logit_bias),
                            _valid(mask, batch), mesh=mesh, axis_name=axis_name)
