"""Alignment objectives for two-tower models: CLIP, SigLIP and Deep CCA.

All three are pure functions of two batches of embeddings ``za``/``zb`` (row ``i`` of
each is a matched pair). They normalise, upcast and compute logits in float32
whatever the input dtype, and jit, vmap and differentiate like any JAX function. The
learned temperature/bias live in ``lepton_mm.alignment.LogitScale``; these functions
take their *values*.

Padding: ``clip_loss`` and ``sigmoid_loss`` take an optional bool ``mask`` ``[batch]``
(True = a real pair). Invalid examples are dropped everywhere — as positives and as
negatives — and the loss is averaged over the valid examples only, so a padded last
batch gives exactly the loss of the unpadded one.

Precision: the similarity (and covariance) products run at ``Precision.HIGHEST``, so
logits are true float32 on GPUs/TPUs too (default precision would use TF32/bf16 passes).

Extremes: rows (views, for CCA) with entries above ``2**50`` are scaled down by an exact
power of two before normalising, so activations up to float32's maximum give the loss of
the rescaled input instead of an overflow. Values are not checked (that would force a
device sync, and under ``jit`` they are unknown): NaN or Inf in a *valid* row makes the
loss NaN, which ``lepton_mm.training.fit`` detects (``nan_policy``); invalid (masked) rows
never matter. Python-number hyperparameters (``logit_scale``, ``logit_bias``, ``eps``)
must be finite.

Multi-device, chunked versions of the first two live in ``lepton_mm.alignment.sharded``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lepton_mm._validation import check_array, check_positive_int

Array = jax.Array

# Stand-in for -inf at masked logits: finite, so max/exp/where stay NaN-free even when a
# whole row is masked, yet far below any logit (|logit| <= |logit_scale| + |bias|).
_NEG = -1e30
# Squared-norm floor for L2 normalisation: a zero vector maps to zero, not NaN.
_NORM_EPS = 1e-12
# Rows whose largest |entry| exceeds this are first scaled down by a power of two (exact),
# so that their squared norm cannot overflow float32 (it would at ~1.8e19 / sqrt(dim)).
# Smaller rows are left untouched, so ordinary inputs give bit-identical results.
_RESCALE_ABOVE = 2.0**50


def _mm(x: Array, y: Array) -> Array:
    """float32 matrix product at full precision.

    Default precision lets GPUs use TF32 and TPUs bf16 passes (~1e-3 relative error),
    which at a CLIP scale of 100 moves logits by ~0.1. These products are tiny next to
    the encoders, so the losses pay for exact float32.
    """
    return jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)


def _downscale_exponent(x: Array, axis: int | None) -> Array:
    """int32 ``e >= 0`` such that ``x * 2**-e`` has max ``|entry|`` below ``_RESCALE_ABOVE``
    along ``axis`` (0 for rows already below it, or non-finite ones). Constant for AD."""
    peak = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axis, keepdims=True))
    _, exponent = jnp.frexp(jnp.where(jnp.isfinite(peak), peak, 0.0))
    return jnp.where(peak > _RESCALE_ABOVE, exponent, 0)


def _l2_normalize(x: Array) -> Array:
    """Float32 L2 normalisation over the last axis; zero vectors stay zero (finite grad).

    Rows with entries above ``2**50`` (up to float32's max) are first scaled down by an
    exact power of two, so huge activations normalise correctly instead of overflowing.
    """
    x = x.astype(jnp.float32)
    x = jnp.ldexp(x, -_downscale_exponent(x, axis=-1))
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS))


def _normalize_valid(x: Array, valid: Array) -> Array:
    """Zeroes invalid rows (so NaN padding cannot leak, even into gradients), then
    L2-normalises in float32."""
    return _l2_normalize(jnp.where(valid[:, None], x, 0))


def _check_scalar(name: str, value: Any) -> None:
    """Checks ``value`` is a finite Python number or a 0-d numeric array; raises naming
    ``name``. Only static information is read (array *values* are not checked: that would
    force a device sync, and under jit they are unknown)."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected a float scalar, got bool.")
    if isinstance(value, (int, float, np.integer, np.floating)):
        if not np.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}.")
        return
    check_array(name, value, "", kind="number")


def _scalar(value: Any) -> Array:
    """A value accepted by ``_check_scalar`` as a float32 scalar array."""
    return jnp.asarray(value).astype(jnp.float32)


def _check_pair(za: Any, zb: Any, mask: Any) -> int:
    """Validates ``za``/``zb`` ``[batch, dim]`` (non-empty) and ``mask`` ``[batch]``;
    returns ``batch``. Creates no arrays, so a failure happens before any computation."""
    dims: dict[str, int] = {}
    check_array("za", za, "batch dim", kind="float", dims=dims, allow_empty=False)
    check_array("zb", zb, "batch dim", kind="float", dims=dims, allow_empty=False)
    if mask is not None:
        check_array("mask", mask, "batch", kind="bool", dims=dims)
    return dims["batch"]


def _valid(mask: Any, batch: int) -> Array:
    """The bool ``[batch]`` validity mask (all True when ``mask`` is None)."""
    return jnp.ones((batch,), dtype=bool) if mask is None else jnp.asarray(mask)


def _masked_logsumexp(x: Array, valid: Array, axis: int) -> Array:
    """``logsumexp`` over ``axis`` of the entries where ``valid``; finite if none are."""
    x = jnp.where(valid, x, _NEG)
    peak = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    total = jnp.sum(jnp.where(valid, jnp.exp(x - peak), 0.0), axis=axis)
    return jnp.log(jnp.maximum(total, jnp.finfo(jnp.float32).tiny)) + jnp.squeeze(peak, axis)


def clip_loss(za: Array, zb: Array, *, logit_scale: Array | float,
              mask: Array | None = None) -> Array:
    """Symmetric InfoNCE (CLIP) loss between two batches of paired embeddings.

    With ``x̂``/``ŷ`` the L2-normalised rows of ``za``/``zb`` and logits
    ``l_ij = t · <x̂_i, ŷ_j>`` (float32), the loss is the mean of two cross-entropies
    whose targets are the diagonal::

      loss = ½ · mean_i [logsumexp_j l_ij − l_ii]  +  ½ · mean_j [logsumexp_i l_ij − l_jj]

    (a→b over rows, b→a over columns), exactly as in CLIP and TorchMultimodal's
    ``contrastive_loss_with_temperature``.

    Args:
      za: float ``[batch, dim]``, one modality's embeddings (normalised inside, so any
        scale is fine; a zero row gives zero logits, not NaN).
      zb: float ``[batch, dim]``, the other modality's; row ``i`` is paired with row ``i``
        of ``za``.
      logit_scale: float scalar ``t``, the *multiplier* of the cosine similarities
        (``1/temperature``), not its logarithm. ``LogitScale()()[0]`` gives it.
      mask: optional bool ``[batch]``, True for real pairs. Invalid examples are neither
        positives nor negatives and the means run over valid examples only; a batch with
        no valid example has loss 0. Invalid rows may hold anything (even NaN): they
        get zero gradient and do not affect the rest.

    Returns:
      float32 scalar.

    Raises:
      TypeError: an argument is not an array or has the wrong dtype kind.
      ValueError: wrong ranks, an empty ``batch`` or ``dim`` axis, ``za``/``zb``/``mask``
        that disagree on ``batch`` or ``dim``, or a non-finite Python-number scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> z = jnp.eye(3)
      >>> round(float(clip_loss(z, 2.0 * z, logit_scale=100.0)), 6)  # aligned: ~0
      0.0
      >>> round(float(clip_loss(z, z, logit_scale=0.0)), 4)  # chance: log(3)
      1.0986

    References:
      Radford et al., "Learning Transferable Visual Models From Natural Language
      Supervision", ICML 2021. https://arxiv.org/abs/2103.00020
      van den Oord et al., "Representation Learning with Contrastive Predictive Coding",
      2018. https://arxiv.org/abs/1807.03748
    """
    batch = _check_pair(za, zb, mask)
    _check_scalar("logit_scale", logit_scale)
    valid, t = _valid(mask, batch), _scalar(logit_scale)
    a, b = _normalize_valid(za, valid), _normalize_valid(zb, valid)
    logits = t * _mm(a, b.T)
    positive = t * jnp.sum(a * b, axis=-1)
    rows = _masked_logsumexp(logits, valid[None, :], axis=1) - positive
    cols = _masked_logsumexp(logits, valid[:, None], axis=0) - positive
    count = jnp.maximum(jnp.sum(valid, dtype=jnp.float32), 1.0)
    return 0.5 * jnp.sum(jnp.where(valid, rows + cols, 0.0)) / count


def sigmoid_loss(za: Array, zb: Array, *, logit_scale: Array | float,
                 logit_bias: Array | float, mask: Array | None = None) -> Array:
    """SigLIP pairwise sigmoid loss between two batches of paired embeddings.

    Every pair ``(i, j)`` is an independent binary problem, positive on the diagonal::

      loss = −(1/B) Σ_ij log σ(z_ij · (t · <x̂_i, ŷ_j> + b)),   z_ij = +1 if i = j else −1

    with ``x̂``/``ŷ`` the L2-normalised rows, computed with ``log_sigmoid`` in float32
    (big_vision's formulation). ``B`` is the number of valid examples.

    Args:
      za: float ``[batch, dim]`` (normalised inside).
      zb: float ``[batch, dim]``; row ``i`` is paired with row ``i`` of ``za``.
      logit_scale: float scalar ``t``, the multiplier (not its log). SigLIP initialises
        ``t = 10``.
      logit_bias: float scalar ``b``. SigLIP initialises ``b = −10``.
      mask: optional bool ``[batch]``, True for real pairs; pairs involving an invalid
        example are dropped and ``B`` counts valid examples (loss 0 if there are none).
        Invalid rows may hold anything (even NaN): they get zero gradient.

    Returns:
      float32 scalar.

    Raises:
      TypeError: an argument is not an array or has the wrong dtype kind.
      ValueError: wrong ranks, an empty ``batch`` or ``dim`` axis, ``za``/``zb``/``mask``
        that disagree on ``batch`` or ``dim``, or a non-finite Python-number scalar.

    Examples:
      Orthonormal, perfectly paired embeddings have logits ``t + b`` on the diagonal and
      ``b`` elsewhere, so the loss is ``−log σ(t + b) − (B − 1) log σ(−b)``:

      >>> import jax.numpy as jnp
      >>> z = jnp.eye(3)
      >>> round(float(sigmoid_loss(z, z, logit_scale=10.0, logit_bias=-10.0)), 5)
      0.69324

    References:
      Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023.
      https://arxiv.org/abs/2303.15343
    """
    batch = _check_pair(za, zb, mask)
    _check_scalar("logit_scale", logit_scale)
    _check_scalar("logit_bias", logit_bias)
    valid, t, bias = _valid(mask, batch), _scalar(logit_scale), _scalar(logit_bias)
    a, b = _normalize_valid(za, valid), _normalize_valid(zb, valid)
    logits = t * _mm(a, b.T) + bias
    eye = jnp.eye(logits.shape[0], dtype=bool)
    loglik = jax.nn.log_sigmoid(jnp.where(eye, logits, -logits))
    pairs = valid[:, None] & valid[None, :]
    count = jnp.maximum(jnp.sum(valid, dtype=jnp.float32), 1.0)
    return -jnp.sum(jnp.where(pairs, loglik, 0.0)) / count


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _sum_sqrt_top_eigenvalues(m: Array, k: int, eps: float) -> Array:
    """Σ of √λ over the ``k`` largest eigenvalues of the PSD matrix ``m``.

    The derivative uses first-order eigenvalue perturbation, ``dλ_i = v_iᵀ dm v_i``, with
    ``d√λ/dλ`` capped at ``1/(2√eps)``: finite even for repeated or zero eigenvalues,
    where differentiating ``eigh``/``svd`` gives NaN.
    """
    w = jnp.linalg.eigvalsh(m)[-k:]
    return jnp.sum(jnp.sqrt(jnp.maximum(w, 0.0)))


@_sum_sqrt_top_eigenvalues.defjvp
def _sum_sqrt_top_eigenvalues_jvp(k, eps, primals, tangents):
    (m,), (dm,) = primals, tangents
    w, v = jnp.linalg.eigh(m)
    w, v = w[-k:], v[:, -k:]
    dw = jnp.sum(v * _mm(dm, v), axis=0)  # v_kᵀ dm v_k
    value = jnp.sum(jnp.sqrt(jnp.maximum(w, 0.0)))
    return value, jnp.sum(0.5 * jax.lax.rsqrt(jnp.maximum(w, eps)) * dw)


def cca_loss(za: Array, zb: Array, *, eps: float = 1e-4, top_k: int | None = None) -> Array:
    """Deep CCA objective: minus the sum of the canonical correlations of ``za``, ``zb``.

    With centred views and regularised covariances ``Σaa + eps·I``, ``Σbb + eps·I``,
    ``Σab`` (normalised by ``batch − 1``), the canonical correlations are the singular
    values of ``T = Σaa^{-1/2} Σab Σbb^{-1/2}``; the loss is ``−‖T‖_*`` (their sum) or,
    with ``top_k``, minus the sum of the ``top_k`` largest.

    Numerics (all float32): the views are whitened by Cholesky factors,
    ``T' = La⁻¹ Σab Lb⁻ᵀ`` with ``Σ = L Lᵀ``, which equals ``T`` up to orthogonal factors
    on each side and so has the same singular values, while differentiating stably even
    when the regularised covariances have repeated eigenvalues (``batch < dim``); the
    correlations are ``√λ`` of ``T'ᵀT'`` (the smaller side), whose derivative is capped
    at ``1/(2√eps)`` near zero. Gradients are finite for any input of full batch.

    Args:
      za: float ``[batch, dim_a]``, view A (``batch >= 2``).
      zb: float ``[batch, dim_b]``, view B; row ``i`` pairs with row ``i`` of ``za``.
      eps: positive ridge added to both covariance diagonals (Andrew et al.'s ``r1``,
        ``r2``); also the floor of the correlation-derivative cap.
      top_k: optional positive int ``<= min(dim_a, dim_b)``: sum only the ``top_k``
        largest correlations (all of them by default).

    Returns:
      float32 scalar in ``[−min(dim_a, dim_b), 0]`` (up to the ridge).

    Raises:
      TypeError: an argument is not a float array.
      ValueError: wrong ranks, batch sizes that differ or are < 2, ``eps`` not positive
        and finite, or a ``top_k`` out of range.

    Examples:
      Two views that are invertible linear maps of each other are perfectly correlated
      in every direction:

      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(0), (512, 3))
      >>> y = x @ jnp.array([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 3.0, -1.0]])
      >>> round(float(cca_loss(x, y, eps=1e-6)), 2)
      -3.0

    References:
      Andrew et al., "Deep Canonical Correlation Analysis", ICML 2013.
      https://proceedings.mlr.press/v28/andrew13.html
      Hotelling, "Relations Between Two Sets of Variates", Biometrika 1936.
    """
    dims: dict[str, int] = {}
    check_array("za", za, "batch dim_a", kind="float", dims=dims)
    check_array("zb", zb, "batch dim_b", kind="float", dims=dims)
    batch, dim_a, dim_b = dims["batch"], dims["dim_a"], dims["dim_b"]
    if batch < 2:
        raise ValueError(f"za: CCA needs batch >= 2 to estimate covariances, got {batch}.")
    if dim_a == 0 or dim_b == 0:
        raise ValueError(f"za, zb: feature dims must be positive, got {dim_a} and {dim_b}.")
    if (isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating))
            or not 0 < eps < np.inf):
        raise ValueError(f"eps: expected a positive float (finite), got {eps!r}.")
    rank = min(dim_a, dim_b)
    k = rank if top_k is None else check_positive_int("top_k", top_k)
    if k > rank:
        raise ValueError(f"top_k: expected at most min(dim_a, dim_b) = {rank}, got {k}.")

    a = za.astype(jnp.float32)
    b = zb.astype(jnp.float32)
    # Views with entries above 2**50 are scaled down by an exact power of two (and their
    # ridge with them), so the covariances cannot overflow; this changes nothing else.
    exp_a, exp_b = _downscale_exponent(a, axis=None), _downscale_exponent(b, axis=None)
    a, b = jnp.ldexp(a, -exp_a), jnp.ldexp(b, -exp_b)
    ridge_a = jnp.ldexp(jnp.float32(eps), -2 * exp_a)
    ridge_b = jnp.ldexp(jnp.float32(eps), -2 * exp_b)
    a = a - jnp.mean(a, axis=0, keepdims=True)
    b = b - jnp.mean(b, axis=0, keepdims=True)
    scale = 1.0 / (batch - 1)
    cov_aa = scale * _mm(a.T, a) + ridge_a * jnp.eye(dim_a, dtype=jnp.float32)
    cov_bb = scale * _mm(b.T, b) + ridge_b * jnp.eye(dim_b, dtype=jnp.float32)
    cov_ab = scale * _mm(a.T, b)
    chol_a = jnp.linalg.cholesky(cov_aa)
    chol_b = jnp.linalg.cholesky(cov_bb)
    left = jax.scipy.linalg.solve_triangular(chol_a, cov_ab, lower=True)  # La⁻¹ Σab
    t = jax.scipy.linalg.solve_triangular(chol_b, left.T, lower=True).T  # ... Lb⁻ᵀ
    gram = _mm(t.T, t) if dim_b <= dim_a else _mm(t, t.T)
    gram = 0.5 * (gram + gram.T)
    return -_sum_sqrt_top_eigenvalues(gram, k, float(eps))
