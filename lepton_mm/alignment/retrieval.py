"""Evaluating a shared embedding space with labels: class-level retrieval and zero-shot.

Pure functions of embeddings and integer labels; they normalise and compare in float32
(cosine similarity, products at ``Precision.HIGHEST``) whatever the input dtype, and are
wrapped in ``jax.jit`` with their hyperparameters static.

  first_match_rank          rank of the best same-class gallery item, per query
  class_recall_at_k         fraction of queries with a same-class item in the top k
  chance_class_recall_at_k  the same for a uniformly random ranking (the baseline)
  zero_shot_logits          cosine of each embedding with each class's prompt embedding(s)
  zero_shot_classify        the class of the nearest prompt: classification from text alone

Host-side helpers for evaluation loops (numpy in, Python floats out):

  paired_class_recall         class-level recall@k both ways between two modalities,
                              queries in chunks (bounded memory)
  chance_paired_class_recall  its random-ranking baseline, in the same layout
  zero_shot_accuracy          accuracy of ``zero_shot_classify``
  embed_in_batches            a model's embedding method over a whole split, jit-compiled
                              once for fixed-size batches

Class-level means a hit is *any* gallery item of the query's class, not the query's own
partner (``lepton_mm.metrics.recall_at_k`` scores that instance-level task).

Ties are resolved against the query (the pessimistic, order-independent rule of
``lepton_mm.metrics.recall_at_k``): an other-class item scoring exactly as high as the
best same-class item ranks ahead of it, so a constant embedding never looks good. A NaN
score counts against the query as well (a NaN same-class score is the lowest, a NaN
other-class score the highest), so NaN embeddings give misses, never hits.

Memory: the retrieval functions build the ``[queries, items]`` similarity matrix; for
large galleries split the queries into chunks (every result is per query).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lepton_mm._validation import check_array, check_positive_int
from lepton_mm.alignment.losses import _l2_normalize, _mm

Array = jax.Array


def _check_retrieval(query: Array, gallery: Array, query_labels: Array,
                     gallery_labels: Array) -> dict[str, int]:
    """Validates the four retrieval inputs; returns the bound axis sizes."""
    dims: dict[str, int] = {}
    check_array("query", query, "queries dim", kind="float", dims=dims)
    check_array("gallery", gallery, "items dim", kind="float", dims=dims)
    check_array("query_labels", query_labels, "queries", kind="int", dims=dims)
    check_array("gallery_labels", gallery_labels, "items", kind="int", dims=dims)
    if dims["items"] == 0:
        raise ValueError(f"gallery: the gallery is empty (shape {tuple(gallery.shape)}).")
    if dims["dim"] == 0:
        raise ValueError(f"query: the embedding axis 'dim' is empty (shape "
                         f"{tuple(query.shape)}).")
    return dims


def _check_k(k: int, items: int) -> int:
    k = check_positive_int("k", k)
    if k > items:
        raise ValueError(f"k: expected at most the gallery size ({items} items), got {k}.")
    return k


@jax.jit
def first_match_rank(query: Array, gallery: Array, query_labels: Array,
                     gallery_labels: Array) -> Array:
    """0-based rank of the highest-scoring same-class gallery item, for each query.

    Gallery items are ranked by cosine similarity to the query; the rank counts the
    other-class items scoring at least as high as the best same-class one (ties go
    against the query). ``first_match_rank < k`` is a class-level hit at ``k``.

    Args:
      query: float ``[queries, dim]`` embeddings (normalised inside; a zero row scores 0
        against everything).
      gallery: float ``[items, dim]`` embeddings of the other modality (``items >= 1``).
      query_labels: int ``[queries]`` class of each query.
      gallery_labels: int ``[items]`` class of each gallery item.

    Returns:
      int32 ``[queries]`` in ``[0, items]``; ``items`` for a query whose class is absent
      from the gallery (it can never be a hit).

    Raises:
      TypeError: an argument is not an array or has the wrong dtype kind.
      ValueError: wrong ranks, an empty gallery or embedding axis, or sizes that disagree.

    Examples:
      >>> import jax.numpy as jnp
      >>> query = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> gallery = jnp.array([[1.0, 0.1], [0.9, 0.5], [0.0, 1.0]])
      >>> first_match_rank(query, gallery, jnp.array([1, 7]),
      ...                  jnp.array([0, 1, 1])).tolist()  # query 1's class is absent
      [1, 3]
    """
    dims = _check_retrieval(query, gallery, query_labels, gallery_labels)
    similarity = _mm(_l2_normalize(query), _l2_normalize(gallery).T)  # [queries, items]
    same = query_labels[:, None] == gallery_labels[None, :]
    nan = jnp.isnan(similarity)
    positive = jnp.where(same & ~nan, similarity, -jnp.inf)
    negative = jnp.where(nan, jnp.inf, similarity)
    best = jnp.max(positive, axis=1, keepdims=True)  # -inf if the class is absent
    ahead = jnp.sum(~same & (negative >= best), axis=1, dtype=jnp.int32)
    has_match = jnp.any(same, axis=1)
    return jnp.where(has_match, ahead, jnp.int32(dims["items"]))


@functools.partial(jax.jit, static_argnames=("k",))
def class_recall_at_k(query: Array, gallery: Array, query_labels: Array,
                      gallery_labels: Array, *, k: int) -> Array:
    """Class-level retrieval recall@k: queries whose top ``k`` holds a same-class item.

    For each query the gallery is ranked by cosine similarity; the query is a hit if at
    least one of the ``k`` highest-ranked items has the query's label (ties against the
    query, see ``first_match_rank``). E.g. image → audio on AV-MNIST: an image of a 7 is
    a hit at 5 if any of its 5 nearest clips is a spoken "seven".

    Args:
      query: float ``[queries, dim]`` embeddings (normalised inside).
      gallery: float ``[items, dim]`` embeddings of the gallery.
      query_labels: int ``[queries]`` class of each query.
      gallery_labels: int ``[items]`` class of each gallery item.
      k: positive int, at most ``items``.

    Returns:
      float32 scalar in ``[0, 1]``: the fraction of hits (NaN for zero queries). A query
      whose class is absent from the gallery is a miss.

    Raises:
      TypeError: an argument is not an array or has the wrong dtype kind.
      ValueError: wrong ranks or sizes (as ``first_match_rank``), or ``k`` not a positive
        int or larger than the gallery.

    Examples:
      >>> import jax.numpy as jnp
      >>> query = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> gallery = jnp.array([[1.0, 0.1], [0.9, 0.5], [0.0, 1.0]])
      >>> labels_q, labels_g = jnp.array([1, 0]), jnp.array([0, 1, 1])
      >>> float(class_recall_at_k(query, gallery, labels_q, labels_g, k=1))
      0.0
      >>> float(class_recall_at_k(query, gallery, labels_q, labels_g, k=2))
      0.5
    """
    dims = _check_retrieval(query, gallery, query_labels, gallery_labels)
    k = _check_k(k, dims["items"])
    ranks = first_match_rank(query, gallery, query_labels, gallery_labels)
    return jnp.mean((ranks < k).astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("k",))
def chance_class_recall_at_k(query_labels: Array, gallery_labels: Array, *,
                             k: int) -> Array:
    """Expected class-level recall@k of a uniformly random ranking of the gallery.

    A query whose class has ``m`` of the ``n`` gallery items misses when the top ``k``
    is drawn from the ``n − m`` others: with probability
    ``C(n − m, k) / C(n, k) = Π_{j<k} (n − m − j) / (n − j)``. The result is the mean of
    ``1 −`` that over the queries — the baseline of ``class_recall_at_k``.

    Args:
      query_labels: int ``[queries]`` class of each query.
      gallery_labels: int ``[items]`` class of each gallery item (``items >= 1``).
      k: positive int, at most ``items``.

    Returns:
      float32 scalar in ``[0, 1]`` (NaN for zero queries).

    Raises:
      TypeError: a label array is not an integer array.
      ValueError: wrong ranks, an empty gallery, or a bad ``k``.

    Examples:
      Ten balanced classes: recall@1 is 1/10, recall@5 ``1 − Π_{j<5} (90 − j)/(100 − j)``.

      >>> import jax.numpy as jnp
      >>> labels = jnp.arange(100) % 10
      >>> round(float(chance_class_recall_at_k(labels, labels, k=1)), 4)
      0.1
      >>> round(float(chance_class_recall_at_k(labels, labels, k=5)), 4)
      0.4162
    """
    dims: dict[str, int] = {}
    check_array("query_labels", query_labels, "queries", kind="int", dims=dims)
    check_array("gallery_labels", gallery_labels, "items", kind="int", dims=dims)
    if dims["items"] == 0:
        raise ValueError("gallery_labels: the gallery is empty.")
    n = dims["items"]
    k = _check_k(k, n)
    ordered = jnp.sort(gallery_labels)
    matches = (jnp.searchsorted(ordered, query_labels, side="right")
               - jnp.searchsorted(ordered, query_labels, side="left"))  # [queries]
    j = jnp.arange(k, dtype=jnp.float32)
    others = (n - matches).astype(jnp.float32)[:, None]  # [queries, 1]
    miss = jnp.prod(jnp.clip((others - j[None, :]) / (n - j[None, :]), 0.0, 1.0), axis=1)
    return jnp.mean(1.0 - miss)


def _check_zero_shot(embeddings: Array, class_embeddings: Array) -> None:
    dims: dict[str, int] = {}
    check_array("embeddings", embeddings, "batch dim", kind="float", dims=dims)
    layout = "classes dim" if getattr(class_embeddings, "ndim", None) != 3 else \
        "classes prompts dim"
    check_array("class_embeddings", class_embeddings, layout, kind="float", dims=dims,
                allow_empty=False)


@jax.jit
def zero_shot_logits(embeddings: Array, class_embeddings: Array) -> Array:
    """Cosine similarity of each embedding with each class's text embedding.

    With several prompts per class (``[classes, prompts, dim]``) the class embedding is
    CLIP's prompt ensemble: the mean of the L2-normalised prompt embeddings,
    renormalised.

    Args:
      embeddings: float ``[batch, dim]``, e.g. audio projected into a text space
        (normalised inside).
      class_embeddings: float ``[classes, dim]`` (one prompt per class, e.g. MiniLM's
        embedding of "the spoken digit seven") or ``[classes, prompts, dim]``.

    Returns:
      float32 ``[batch, classes]`` in ``[-1, 1]``.

    Raises:
      TypeError: an argument is not a float array.
      ValueError: wrong ranks, an empty ``classes``/``prompts``/``dim`` axis, or
        embedding sizes that disagree.

    Examples:
      >>> import jax.numpy as jnp
      >>> prompts = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> zero_shot_logits(jnp.array([[3.0, 0.0], [0.0, -1.0]]), prompts).tolist()
      [[1.0, 0.0], [0.0, -1.0]]
    """
    _check_zero_shot(embeddings, class_embeddings)
    classes = _l2_normalize(class_embeddings)
    if classes.ndim == 3:
        classes = _l2_normalize(jnp.mean(classes, axis=1))
    return _mm(_l2_normalize(embeddings), classes.T)


@jax.jit
def zero_shot_classify(embeddings: Array, class_embeddings: Array) -> Array:
    """Zero-shot classification: the class whose text embedding is nearest (cosine).

    ``argmax`` of ``zero_shot_logits``; an exact tie goes to the lowest class index.

    Args:
      embeddings: float ``[batch, dim]`` (normalised inside).
      class_embeddings: float ``[classes, dim]`` or ``[classes, prompts, dim]`` (prompt
        ensemble, see ``zero_shot_logits``).

    Returns:
      int32 ``[batch]`` class indices in ``[0, classes)``.

    Raises:
      TypeError / ValueError: as ``zero_shot_logits``.

    Examples:
      >>> import jax.numpy as jnp
      >>> prompts = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
      >>> zero_shot_classify(jnp.array([[0.2, 0.9], [-5.0, 1.0]]), prompts).tolist()
      [1, 2]

    References:
      Radford et al., "Learning Transferable Visual Models From Natural Language
      Supervision", ICML 2021 (zero-shot transfer and prompt ensembling).
      https://arxiv.org/abs/2103.00020
    """
    return jnp.argmax(zero_shot_logits(embeddings, class_embeddings), axis=1).astype(
        jnp.int32)


# ------------------------------------------------------------------ host-side helpers


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks: expected at least one k.")
    return tuple(check_positive_int("ks", k) for k in ks)


def paired_class_recall(embeddings: Mapping[str, Any], labels: Any, ks: Sequence[int], *,
                        chunk: int = 1000) -> dict[str, dict[str, float]]:
    """Class-level recall@k in both directions between two modalities' embeddings.

    Row ``i`` of each modality embeds example ``i``; every example of the other modality
    is the gallery (``first_match_rank``: a hit is any item of the query's class, ties
    against the query). Queries go through in chunks of ``chunk``, so memory is
    ``[chunk, n]``, never ``[n, n]``.

    Args:
      embeddings: exactly two entries, modality name -> float ``[n, dim]``, e.g.
        ``{"image": ..., "audio": ...}``.
      labels: int ``[n]``, the class of each example (shared by both modalities).
      ks: positive ints, the ``k`` of recall@k.
      chunk: queries per ``first_match_rank`` call.

    Returns:
      ``{"<a>_to_<b>": {"recall@<k>": float, ...}, "<b>_to_<a>": {...}}``, ``a`` and
      ``b`` in ``embeddings``' order, the ``k`` in ``ks``' order; each value is the
      fraction of queries in ``[0, 1]``.

    Raises:
      ValueError: not two modalities, a bad ``k`` or ``chunk``, or the checks of
        ``first_match_rank`` (shapes, dtypes, an empty gallery).

    Examples:
      >>> import numpy as np
      >>> image = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
      >>> audio = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
      >>> paired_class_recall({"image": image, "audio": audio}, np.array([0, 1]), (1, 2))
      {'image_to_audio': {'recall@1': 0.0, 'recall@2': 1.0}, \
'audio_to_image': {'recall@1': 0.0, 'recall@2': 1.0}}
    """
    if len(embeddings) != 2:
        raise ValueError(f"embeddings: expected two modalities, got {list(embeddings)}.")
    ks, chunk = _check_ks(ks), check_positive_int("chunk", chunk)
    (a, x), (b, y) = embeddings.items()
    labels = np.asarray(labels)
    out = {}
    for name, query, gallery in ((f"{a}_to_{b}", x, y), (f"{b}_to_{a}", y, x)):
        ranks = np.concatenate([
            np.asarray(first_match_rank(query[i:i + chunk], gallery, labels[i:i + chunk],
                                        labels))
            for i in range(0, len(query), chunk)])
        out[name] = {f"recall@{k}": float(np.mean(ranks < k)) for k in ks}
    return out


def chance_paired_class_recall(modalities: Sequence[str], labels: Any,
                               ks: Sequence[int]) -> dict[str, dict[str, float]]:
    """The chance level of ``paired_class_recall``: a uniformly random ranking.

    ``chance_class_recall_at_k`` of the labels against themselves, the same in both
    directions.

    Args:
      modalities: the two modality names, in ``paired_class_recall``'s order.
      labels: int ``[n]``, the class of each example.
      ks: positive ints, each at most ``n``.

    Returns:
      ``paired_class_recall``'s layout: ``{"<a>_to_<b>": {"recall@<k>": float}, ...}``.

    Examples:
      >>> import numpy as np
      >>> chance_paired_class_recall(("image", "audio"), np.array([0, 0, 1, 1]), (1,))
      {'image_to_audio': {'recall@1': 0.5}, 'audio_to_image': {'recall@1': 0.5}}
    """
    if len(modalities) != 2:
        raise ValueError(f"modalities: expected two names, got {list(modalities)}.")
    a, b = modalities
    row = {f"recall@{k}": float(chance_class_recall_at_k(labels, labels, k=k))
           for k in _check_ks(ks)}
    return {f"{a}_to_{b}": dict(row), f"{b}_to_{a}": dict(row)}


def zero_shot_accuracy(embeddings: Any, labels: Any, class_embeddings: Any) -> float:
    """Fraction of ``embeddings`` whose ``zero_shot_classify`` class is their label.

    Args:
      embeddings: float ``[batch, dim]``.
      labels: int ``[batch]``.
      class_embeddings: float ``[classes, dim]`` or ``[classes, prompts, dim]`` (prompt
        ensemble, see ``zero_shot_logits``).

    Returns:
      A Python float in ``[0, 1]``.

    Examples:
      >>> import numpy as np
      >>> prompts = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
      >>> x = np.array([[2.0, 1.0], [1.0, 3.0], [0.0, -1.0]], np.float32)
      >>> zero_shot_accuracy(x, np.array([0, 1, 1]), prompts)
      0.6666666666666666
    """
    predicted = np.asarray(zero_shot_classify(embeddings, class_embeddings))
    labels = np.asarray(labels)
    if labels.shape != predicted.shape:
        raise ValueError(f"labels: expected shape {predicted.shape}, got {labels.shape}.")
    return float(np.mean(predicted == labels))


@functools.cache
def _embed_fn() -> Any:
    """jit of ``getattr(nnx.merge(graphdef, state), method)(inputs)``."""

    def embed(graphdef, state, inputs, method):
        return getattr(nnx.merge(graphdef, state), method)(inputs)

    return jax.jit(embed, static_argnames=("graphdef", "method"))


def embed_in_batches(model: nnx.Module, method: str, inputs: Any,
                     batch_size: int) -> np.ndarray:
    """``model.<method>(batch)`` over every example of ``inputs``, in eval mode.

    Batches have a fixed size (the last one padded with copies of the first example, cut
    off again), so the method compiles once per shape; ``model`` itself is untouched (a
    copy is switched to eval mode: no dropout, running statistics).

    Args:
      model: an ``nnx.Module``.
      method: the name of its method to call, e.g. ``"embed"`` or ``"embed_a"``; it takes
        one batch (a pytree like ``inputs``) and returns an array ``[batch, ...]``.
      inputs: a pytree of arrays ``[n, ...]`` (e.g. ``(log_mel, mask)``), ``n >= 1``.
      batch_size: examples per call.

    Returns:
      numpy ``[n, ...]``: the method's outputs, in order.

    Raises:
      ValueError: a bad ``batch_size``, no example, or leaves of different lengths.
    """
    batch_size = check_positive_int("batch_size", batch_size)
    sizes = {len(leaf) for leaf in jax.tree.leaves(inputs)}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"inputs: expected leaves with the same positive length, got "
                         f"lengths {sorted(sizes)}.")
    (n,) = sizes
    model = nnx.clone(model)
    model.eval()
    graphdef, state = nnx.split(model)
    out = []
    for i in range(0, n, batch_size):
        rows = np.arange(i, i + batch_size)
        rows[rows >= n] = 0
        batch = jax.tree.map(lambda a, r=rows: a[r], inputs)
        out.append(np.asarray(_embed_fn()(graphdef, state, batch, method)))
    return np.concatenate(out)[:n]
