"""Tests for lepton_mm.alignment.retrieval against brute-force numpy references."""

import doctest
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_mm.alignment import (
    chance_class_recall_at_k,
    class_recall_at_k,
    first_match_rank,
    retrieval,
    zero_shot_classify,
    zero_shot_logits,
)

# ----------------------------------------------------------------- numpy references


def _np_cosine(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def _np_first_match_rank(query, gallery, query_labels, gallery_labels):
    """Sorts the gallery for each query (score descending, ties: other classes first)
    and returns the position of the first same-class item (``items`` if none)."""
    scores = _np_cosine(query, gallery)
    ranks = []
    for i in range(len(query)):
        same = np.asarray(gallery_labels) == query_labels[i]
        order = np.lexsort((same, -scores[i]))  # last key is primary
        hits = np.flatnonzero(same[order])
        ranks.append(hits[0] if len(hits) else len(gallery))
    return np.array(ranks)


def _np_recall(query, gallery, query_labels, gallery_labels, k):
    """Fraction of queries whose top-k (sorted as above) holds a same-class item."""
    scores = _np_cosine(query, gallery)
    hits = []
    for i in range(len(query)):
        same = np.asarray(gallery_labels) == query_labels[i]
        top = np.lexsort((same, -scores[i]))[:k]
        hits.append(same[top].any())
    return np.mean(hits)


def _data(seed, queries=9, items=13, dim=4, classes=4, duplicates=4):
    """Random embeddings whose gallery repeats some rows (exact ties) with other labels."""
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(queries, dim)).astype(np.float32)
    gallery = rng.normal(size=(items, dim)).astype(np.float32)
    gallery[-duplicates:] = gallery[:duplicates]  # identical rows: bitwise-equal scores
    gallery[1] = 3.0 * query[0]  # scale does not matter: query 0's best item is row 1
    query_labels = rng.integers(0, classes, queries).astype(np.int32)
    gallery_labels = rng.integers(0, classes, items).astype(np.int32)
    query_labels[-1] = classes  # a class with no gallery item
    return query, gallery, query_labels, gallery_labels


# ------------------------------------------------------------------- class recall


@pytest.mark.parametrize("seed", range(5))
def test_first_match_rank_matches_a_sorting_reference(seed):
    args = _data(seed)
    np.testing.assert_array_equal(first_match_rank(*args), _np_first_match_rank(*args))


@pytest.mark.parametrize("seed", range(3))
def test_recall_matches_the_reference_for_every_k(seed):
    args = _data(seed)
    jitted = jax.jit(class_recall_at_k, static_argnames="k")
    for k in range(1, len(args[1]) + 1):
        expected = _np_recall(*args, k)
        np.testing.assert_allclose(class_recall_at_k(*args, k=k), expected, rtol=1e-6)
        np.testing.assert_allclose(jitted(*args, k=k), expected, rtol=1e-6)


def test_hand_computed_example():
    # Query 0 (class 1): item 0 (class 0) scores 0.995, item 1 (class 1) 0.874 → rank 1.
    # Query 1 (class 0): items 2 (1.0) and 1 (0.486) beat item 0 (0.0995) → rank 2.
    query = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    gallery = jnp.array([[1.0, 0.1], [0.9, 0.5], [0.0, 1.0]])
    q, g = jnp.array([1, 0]), jnp.array([0, 1, 1])
    assert first_match_rank(query, gallery, q, g).tolist() == [1, 2]
    assert [float(class_recall_at_k(query, gallery, q, g, k=k)) for k in (1, 2, 3)] == [
        0.0, 0.5, 1.0]


def test_ties_go_against_the_query():
    # Constant embeddings: every score ties, so the same-class items rank after all the
    # others and recall@k is 1 only once k exceeds the number of other-class items.
    query = jnp.ones((2, 3))
    gallery = jnp.ones((5, 3))
    q, g = jnp.array([0, 1]), jnp.array([0, 0, 1, 1, 1])
    assert first_match_rank(query, gallery, q, g).tolist() == [3, 2]
    assert [float(class_recall_at_k(query, gallery, q, g, k=k)) for k in range(1, 6)] == [
        0.0, 0.0, 0.5, 1.0, 1.0]
    # One exact tie between the best same-class item and another class: pessimistic.
    tied = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert first_match_rank(jnp.array([[1.0, 0.0]]), tied, jnp.array([1]),
                            jnp.array([0, 1, 1])).tolist() == [1]


def test_absent_class_is_a_miss_for_every_k():
    query, gallery = jnp.eye(2), jnp.eye(2)
    q, g = jnp.array([0, 5]), jnp.array([0, 1])
    assert first_match_rank(query, gallery, q, g).tolist() == [0, 2]
    assert float(class_recall_at_k(query, gallery, q, g, k=2)) == 0.5


def test_cosine_is_scale_invariant_and_dtype_free():
    query, gallery, q, g = _data(7)
    base = first_match_rank(query, gallery, q, g)
    scaled = first_match_rank(5.0 * query, gallery * np.float32(0.01), q, g)
    np.testing.assert_array_equal(base, scaled)
    np.testing.assert_array_equal(base, first_match_rank(query, gallery, q.astype(np.int64),
                                                         g.astype(np.int16)))
    assert first_match_rank(jnp.asarray(query, jnp.bfloat16), gallery, q, g).dtype == jnp.int32


def test_nan_embeddings_are_misses_not_hits():
    gallery = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    g = jnp.array([0, 1, 2])
    nan_query = jnp.array([[jnp.nan, 0.0]])
    for label in range(3):
        assert float(class_recall_at_k(nan_query, gallery, jnp.array([label]), g, k=1)) == 0
    # A NaN other-class item ranks first: query [1, 0] of class 0 falls to rank 1.
    nan_gallery = gallery.at[1].set(jnp.nan)
    assert first_match_rank(jnp.array([[1.0, 0.0]]), nan_gallery, jnp.array([0]),
                            g).tolist() == [1]


def test_zero_queries_give_nan_recall():
    out = class_recall_at_k(jnp.zeros((0, 2)), jnp.eye(2), jnp.zeros((0,), jnp.int32),
                            jnp.array([0, 1]), k=1)
    assert np.isnan(out)


@pytest.mark.parametrize("call, error, match", [
    (lambda q, g, ql, gl: class_recall_at_k(q, g, ql, gl, k=6), ValueError,
     r"k: expected at most the gallery size \(5 items\), got 6"),
    (lambda q, g, ql, gl: class_recall_at_k(q, g, ql, gl, k=0), ValueError,
     "k: expected a positive integer"),
    (lambda q, g, ql, gl: class_recall_at_k(q, g, ql, gl, k=True), ValueError,
     "k: expected a positive integer"),
    (lambda q, g, ql, gl: first_match_rank(q, g[:, :2], ql, gl), ValueError,
     "gallery: expected shape"),
    (lambda q, g, ql, gl: first_match_rank(q, g, ql[:2], gl), ValueError,
     "query_labels: expected shape"),
    (lambda q, g, ql, gl: first_match_rank(q, g, ql, gl[:4]), ValueError,
     "gallery_labels: expected shape"),
    (lambda q, g, ql, gl: first_match_rank(q, g, ql.astype(np.float32), gl), TypeError,
     "query_labels: expected an integer dtype"),
    (lambda q, g, ql, gl: first_match_rank(q[0], g, ql, gl), ValueError,
     "query: expected rank 2"),
    (lambda q, g, ql, gl: first_match_rank(q.tolist(), g, ql, gl), TypeError,
     "query: expected an array"),
    (lambda q, g, ql, gl: first_match_rank(q, g[:0], ql, gl[:0]), ValueError,
     "gallery: the gallery is empty"),
])
def test_bad_arguments_raise_clear_errors(call, error, match):
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(5, 4)).astype(
        np.float32)
    ql, gl = np.array([0, 1, 2], np.int32), np.array([0, 1, 2, 0, 1], np.int32)
    with pytest.raises(error, match=match):
        call(q, g, ql, gl)


# ------------------------------------------------------------------------- chance


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_chance_equals_the_average_over_all_permutations(k):
    gallery_labels = np.array([0, 0, 1, 2, 2, 2], np.int32)
    query_labels = np.array([0, 1, 2, 3], np.int32)  # class 3 is absent: never a hit
    hits = []
    for order in itertools.permutations(range(len(gallery_labels))):
        top = gallery_labels[list(order[:k])]
        hits.append([np.isin(c, top) for c in query_labels])
    expected = np.mean(hits)
    got = chance_class_recall_at_k(query_labels, gallery_labels, k=k)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_chance_matches_random_embeddings_on_average():
    labels = np.arange(200, dtype=np.int32) % 10
    rng = np.random.default_rng(0)
    recalls = [class_recall_at_k(rng.normal(size=(200, 8)).astype(np.float32),
                                 rng.normal(size=(200, 8)).astype(np.float32),
                                 labels, labels, k=5) for _ in range(20)]
    chance = float(chance_class_recall_at_k(labels, labels, k=5))
    assert chance == pytest.approx(1 - np.prod([(180 - j) / (200 - j) for j in range(5)]))
    assert np.mean(recalls) == pytest.approx(chance, abs=0.03)


def test_chance_rejects_k_larger_than_the_gallery():
    with pytest.raises(ValueError, match="k: expected at most the gallery size"):
        chance_class_recall_at_k(np.zeros(3, np.int32), np.zeros(2, np.int32), k=3)


# ---------------------------------------------------------------------- zero-shot


def test_zero_shot_logits_are_cosines():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    prompts = rng.normal(size=(4, 5)).astype(np.float32)
    np.testing.assert_allclose(zero_shot_logits(x, prompts), _np_cosine(x, prompts),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(zero_shot_classify(x, prompts),
                                  np.argmax(_np_cosine(x, prompts), axis=1))
    assert zero_shot_classify(x, prompts).dtype == jnp.int32


def test_prompt_ensemble_is_the_renormalised_mean_of_normalised_prompts():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(7, 3)).astype(np.float32)
    prompts = rng.normal(size=(4, 5, 3)).astype(np.float32)  # [classes, prompts, dim]
    unit = prompts / np.linalg.norm(prompts, axis=-1, keepdims=True)
    expected = _np_cosine(x, unit.mean(axis=1))
    np.testing.assert_allclose(zero_shot_logits(x, prompts), expected, rtol=1e-5,
                               atol=1e-6)
    # Rescaling one prompt does not change anything (each is normalised first).
    prompts[0, 0] *= 100.0
    np.testing.assert_allclose(zero_shot_logits(x, prompts), expected, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(jax.jit(zero_shot_classify)(x, prompts),
                                  np.argmax(expected, axis=1))


def test_zero_shot_ties_go_to_the_lowest_class():
    prompts = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert zero_shot_classify(jnp.array([[2.0, 0.0], [0.0, 0.0]]), prompts).tolist() == [
        0, 0]


@pytest.mark.parametrize("x, prompts, error, match", [
    (np.ones((2, 3), np.float32), np.ones((4, 5), np.float32), ValueError,
     "class_embeddings: expected shape"),
    (np.ones((3,), np.float32), np.ones((4, 3), np.float32), ValueError,
     "embeddings: expected rank 2"),
    (np.ones((2, 3), np.int32), np.ones((4, 3), np.float32), TypeError,
     "embeddings: expected a floating-point dtype"),
    (np.ones((2, 3), np.float32), np.ones((0, 3), np.float32), ValueError,
     "class_embeddings: axis 'classes' is empty"),
    (np.ones((2, 3), np.float32), np.ones((4, 0, 3), np.float32), ValueError,
     "class_embeddings: axis 'prompts' is empty"),
    (np.ones((2, 3), np.float32), np.ones((1, 4, 2, 3), np.float32), ValueError,
     "class_embeddings: expected rank 2"),
])
def test_zero_shot_bad_arguments(x, prompts, error, match):
    with pytest.raises(error, match=match):
        zero_shot_logits(x, prompts)


def test_docstring_examples_run():
    results = doctest.testmod(retrieval, optionflags=doctest.ELLIPSIS, verbose=False)
    assert results.attempted >= 6
    assert results.failed == 0
