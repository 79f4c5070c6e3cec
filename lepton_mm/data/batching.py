"""Batch sources: what ``lepton_mm.training.fit`` and ``evaluate`` read examples from.

A *batch source* (``BatchSource``) knows its number of examples and cuts each epoch into
fixed-size batch dicts (the batch format of ``lepton_mm.models``) with a bool
``batch["valid"]`` marking padding rows. An epoch's batches are a function of
``(seed, epoch)`` only, so the position ``(epoch, batch_index)`` is all a training loop
has to save to resume exactly: ``batches(..., start=batch_index)`` continues where an
interrupted epoch stopped.

  ArrayDataset      every example in memory, one shape: epoch ``e`` in the order of
                    ``epoch_permutation(n, seed, e)``, the last batch padded
  BucketedDataset   variable-length sequences: batches never mix length buckets and
                    are cut to their bucket's length, so each bucket compiles once

Numpy only: nothing here imports JAX or Flax.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["ArrayDataset", "BatchSource", "BucketedDataset", "epoch_permutation"]

_SHUFFLE_TAG = 0


@runtime_checkable
class BatchSource(Protocol):
    """What ``fit`` and ``evaluate`` need from their data.

    ``batches`` yields the epoch's batches in a deterministic order, a function of
    ``(seed, epoch)`` only, each a batch dict (``lepton_mm.models``) of exactly
    ``batch_size`` rows whose bool ``batch["valid"]`` (``[batch_size]``) is False on
    padding rows; over one epoch every example is a valid row exactly once, in
    ``num_batches(batch_size)`` batches. ``start`` skips the epoch's first batches (to
    resume mid-epoch) and ``rows`` selects the rows of each batch this process feeds
    (multi-process data parallelism; ``None``: all rows).

    Attributes:
      arrays: optional, not part of the protocol: the batch dict of *all* examples, for
        a source that holds them in memory (``ArrayDataset`` and ``BucketedDataset``
        do). ``fit`` then checks every example before training (e.g. that class labels
        are in range); otherwise it checks the first batch.
    """

    def __len__(self) -> int:
        """The number of examples."""
        ...

    def num_batches(self, batch_size: int) -> int:
        """Batches per epoch at ``batch_size`` (the same for every seed and epoch)."""
        ...

    def batches(self, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                start: int = 0, rows: slice | None = None) -> Iterator[dict[str, Any]]:
        """Yields the epoch's fixed-size batch dicts from batch ``start`` on."""
        ...


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled example order of ``epoch``: a function of ``(seed, epoch)`` only.

    Args:
      n: number of examples.
      seed: the run's seed.
      epoch: the epoch index.

    Returns:
      int ``[n]``, a permutation of ``range(n)``.
    """
    return _epoch_rng(seed, epoch).permutation(n)


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), _SHUFFLE_TAG])


def _epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int,
                   shuffle: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """An epoch of ``n`` examples cut into batches: ``epoch_permutation`` order (or
    ``range(n)``), the last batch filled up with repeats of real examples, invalid.

    Returns:
      ``[(indices int [batch_size], valid bool [batch_size])]``, ``ceil(n / batch_size)``
      of them.
    """
    batch_size = _check_batch_size(batch_size)
    order = epoch_permutation(n, seed, epoch) if shuffle else np.arange(n)
    pad = -(-n // batch_size) * batch_size - n
    order = np.concatenate([order, np.resize(order, pad)])  # repeats real examples
    valid = np.arange(order.size) < n
    return [(order[i:i + batch_size], valid[i:i + batch_size])
            for i in range(0, order.size, batch_size)]


# ------------------------------------------------------------------------ batch trees


def _tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """``fn`` on every array of a batch tree (dicts, tuples, lists; None stays None)."""
    if tree is None:
        return None
    if isinstance(tree, Mapping):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a NamedTuple
        return type(tree)(*(_tree_map(fn, v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_tree_map(fn, v) for v in tree)
    return fn(tree)


def _tree_leaves(tree: Any, path: str = "") -> list[tuple[str, np.ndarray]]:
    """``[(path, array)]``, paths written like ``['audio'][0]``."""
    if tree is None:
        return []
    if isinstance(tree, Mapping):
        return [leaf for k, v in tree.items() for leaf in _tree_leaves(v, f"{path}[{k!r}]")]
    if isinstance(tree, (tuple, list)):
        return [leaf for i, v in enumerate(tree) for leaf in _tree_leaves(v, f"{path}[{i}]")]
    return [(path, tree)]


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}.")
    return int(batch_size)


# ------------------------------------------------------------------------ ArrayDataset


class ArrayDataset:
    """An in-memory dataset: a pytree of numpy arrays sharing a leading example axis.

    Epoch ``e`` visits the examples in the order ``epoch_permutation(n, seed, e)`` (or in
    dataset order with ``shuffle=False``); the last, partial batch is filled up with
    repeats of real examples whose ``batch["valid"]`` is False, so every batch has the
    same shape. A ``BatchSource``.

    Args:
      arrays: the batch-format dict (see ``lepton_mm.models``) holding *all* examples,
        e.g. ``{"image": x, "text": (ids, mask), "label": y, "present": {"text": p}}``.

    Raises:
      TypeError: ``arrays`` is not a dict.
      ValueError: no arrays, a scalar, leading sizes that differ, no examples, or a
        ``"valid"`` entry (batching adds it).

    Examples:
      >>> import numpy as np
      >>> data = ArrayDataset({"x": np.arange(5.0), "label": np.arange(5)})
      >>> len(data), data[1]["label"].item()
      (5, 1)
      >>> [b["valid"].tolist() for b in data.batches(2, seed=0, epoch=0, shuffle=False)]
      [[True, True], [True, True], [True, False]]
    """

    def __init__(self, arrays: Mapping[str, Any]):
        if not isinstance(arrays, Mapping):
            raise TypeError(f"arrays: expected a dict of arrays, got {type(arrays).__name__}.")
        if "valid" in arrays:
            raise ValueError("arrays: 'valid' is added by batching; remove it.")
        self.arrays = _tree_map(np.asarray, dict(arrays))
        leaves = _tree_leaves(self.arrays)
        if not leaves:
            raise ValueError("arrays: no arrays given.")
        sizes: dict[int, str] = {}
        for path, leaf in leaves:
            if leaf.ndim == 0:
                raise ValueError(f"arrays{path}: expected a leading example axis, got a "
                                 "scalar.")
            sizes.setdefault(leaf.shape[0], path)
        if len(sizes) != 1:
            raise ValueError(f"arrays: leading sizes differ: "
                             f"{ {p: n for n, p in sizes.items()} }.")
        (self._n,) = sizes
        if self._n == 0:
            raise ValueError("arrays: the dataset is empty.")

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: Any) -> dict[str, Any]:
        return _tree_map(lambda a: a[index], self.arrays)

    def num_batches(self, batch_size: int) -> int:
        """Batches per epoch (the last one padded).

        Args:
          batch_size: rows per batch.

        Returns:
          ``ceil(len(self) / batch_size)``.
        """
        return -(-self._n // _check_batch_size(batch_size))

    def batch_indices(self, batch_size: int, *, seed: int, epoch: int,
                      shuffle: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
        """The epoch's batches as example indices.

        Args:
          batch_size: rows per batch.
          seed: the run seed.
          epoch: the epoch number.
          shuffle: shuffle by ``epoch_permutation``; False keeps dataset order.

        Returns:
          ``[(indices int [batch_size], valid bool [batch_size])]``, one per batch.
        """
        return _epoch_batches(self._n, batch_size, seed=seed, epoch=epoch, shuffle=shuffle)

    def batches(self, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                start: int = 0, rows: slice | None = None) -> Iterator[dict[str, Any]]:
        """Yields the epoch's fixed-size batches from batch ``start`` on.

        Args:
          batch_size: rows per batch.
          seed: the run seed.
          epoch: the epoch number (selects the permutation).
          shuffle: shuffle by ``epoch_permutation``; False keeps dataset order.
          start: index of the first batch (to resume mid-epoch).
          rows: the rows of each batch to return (multi-process: this process's share).

        Yields:
          The batch dict with ``batch["valid"]`` (bool ``[batch_size]``).
        """
        rows = rows or slice(None)
        for idx, valid in self.batch_indices(batch_size, seed=seed, epoch=epoch,
                                             shuffle=shuffle)[start:]:
            batch = self._take(idx[rows], idx)
            batch["valid"] = valid[rows]
            yield batch

    def _take(self, idx: np.ndarray, batch_idx: np.ndarray) -> dict[str, Any]:
        """The examples ``idx`` of the batch ``batch_idx`` (all its rows)."""
        del batch_idx
        return self[idx]


# --------------------------------------------------------------------- BucketedDataset


class BucketedDataset(ArrayDataset):
    """Variable-length sequences batched by length bucket, each bucket one shape.

    Each example goes to the smallest ``bucket_bounds`` entry at least as long as its
    sequence (per bucketed modality; with several, the combination of their buckets is
    the bucket). A batch holds examples of one bucket only, and every array under a
    bucketed modality is cut along its time axis (axis 1) to the bucket's bound (or kept
    at its full padded length when that is shorter). So a jitted step compiles once per
    bucket, and short sequences are not padded to the longest one.

    Epoch ``e`` shuffles the examples within each bucket and then the order of all the
    batches, both with ``numpy.random.default_rng([seed, e, 0])``: the batches are a
    function of ``(seed, epoch)`` only. A bucket's last, partial batch is filled up with
    repeats of its own examples, marked invalid; every example is a valid row exactly
    once per epoch. ``shuffle=False`` gives the buckets in increasing length, each in
    dataset order. A ``BatchSource``.

    Args:
      arrays: the batch-format dict of all examples (as for ``ArrayDataset``), the
        sequences of each bucketed modality padded to one length along axis 1.
      lengths: ``{modality: int [n]}``: each example's true sequence length in that
        modality of ``arrays`` (e.g. its mask's row sums).
      bucket_bounds: increasing positive lengths; the last must be at least the longest
        sequence.

    Raises:
      ValueError / TypeError: as ``ArrayDataset``; a ``lengths`` key that is not a
        modality of ``arrays`` or whose arrays have no time axis; lengths of the wrong
        shape, negative or longer than the last bound; bounds that are not increasing
        positive ints.

    Examples:
      >>> import numpy as np
      >>> n_tokens = np.array([3, 12, 5, 30, 7])
      >>> mask = np.arange(32)[None] < n_tokens[:, None]
      >>> data = BucketedDataset({"text": (mask.astype(np.int32), mask),
      ...                         "label": np.arange(5)},
      ...                        {"text": n_tokens}, bucket_bounds=(8, 16, 32))
      >>> for b in data.batches(2, seed=0, epoch=0, shuffle=False):
      ...     print(b["text"][0].shape, b["label"].tolist(), b["valid"].tolist())
      (2, 8) [0, 2] [True, True]
      (2, 8) [4, 0] [True, False]
      (2, 16) [1, 1] [True, False]
      (2, 32) [3, 3] [True, False]
    """

    def __init__(self, arrays: Mapping[str, Any], lengths: Mapping[str, Any], *,
                 bucket_bounds: Sequence[int]):
        super().__init__(arrays)
        bounds = tuple(bucket_bounds) if isinstance(bucket_bounds, Sequence) else None
        if not bounds or any(isinstance(b, bool) or not isinstance(b, (int, np.integer))
                             or b < 1 for b in bounds) or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"bucket_bounds: expected increasing positive ints, got "
                             f"{bucket_bounds!r}.")
        if not isinstance(lengths, Mapping) or not lengths:
            raise TypeError("lengths: expected a non-empty dict {modality: int [n]}.")
        self.bucket_bounds = tuple(int(b) for b in bounds)
        columns, self._cuts = [], {}
        for m in sorted(lengths):
            self._cuts[m] = self._bucket_lengths(m, lengths[m], columns)
        # bucket id of each example: one id per distinct combination of buckets
        _, self._bucket = np.unique(np.stack(columns, 1), axis=0, return_inverse=True)
        self._bucket = self._bucket.reshape(-1)
        self._members = [np.flatnonzero(self._bucket == b)
                         for b in range(int(self._bucket.max()) + 1)]

    def _bucket_lengths(self, modality: str, lengths: Any,
                        columns: list[np.ndarray]) -> np.ndarray:
        """int ``[n]``: the time length each example's batch is cut to in ``modality``."""
        if modality not in self.arrays or modality in ("label", "present"):
            raise ValueError(f"lengths: {modality!r} is not a modality of arrays "
                             f"({sorted(k for k in self.arrays if k != 'label')}).")
        leaves = _tree_leaves(self.arrays[modality])
        times = {a.shape[1] for _, a in leaves if a.ndim >= 2}
        if len(times) != 1 or any(a.ndim < 2 for _, a in leaves):
            raise ValueError(f"lengths[{modality!r}]: every array of arrays[{modality!r}] "
                             "needs the same time axis (axis 1).")
        (full,) = times
        n_tokens = np.asarray(lengths)
        if n_tokens.shape != (len(self),) or not np.issubdtype(n_tokens.dtype, np.integer):
            raise ValueError(f"lengths[{modality!r}]: expected int [{len(self)}], got "
                             f"{n_tokens.dtype} {list(n_tokens.shape)}.")
        if n_tokens.min() < 0 or n_tokens.max() > min(self.bucket_bounds[-1], full):
            raise ValueError(
                f"lengths[{modality!r}]: expected lengths in [0, "
                f"{min(self.bucket_bounds[-1], full)}] (the last bucket bound and the "
                f"arrays' length {full}), got [{n_tokens.min()}, {n_tokens.max()}].")
        index = np.searchsorted(self.bucket_bounds, n_tokens)  # smallest bound >= length
        columns.append(index)
        return np.minimum(np.asarray(self.bucket_bounds)[index], full)

    def num_buckets(self) -> int:
        """The number of non-empty buckets (= distinct batch shapes).

        Returns:
          The count.
        """
        return len(self._members)

    def num_batches(self, batch_size: int) -> int:
        """Batches per epoch: each bucket's last batch is padded on its own.

        Args:
          batch_size: rows per batch.

        Returns:
          ``sum(ceil(bucket size / batch_size))`` over the buckets.
        """
        batch_size = _check_batch_size(batch_size)
        return sum(-(-len(m) // batch_size) for m in self._members)

    def batch_indices(self, batch_size: int, *, seed: int, epoch: int,
                      shuffle: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
        """The epoch's batches as example indices, one bucket per batch.

        Args:
          batch_size: as for ``ArrayDataset.batch_indices``.
          seed: as for ``ArrayDataset.batch_indices``.
          epoch: as for ``ArrayDataset.batch_indices``.
          shuffle: shuffle within buckets and the order of the batches; False keeps
            buckets in increasing length, examples in dataset order.

        Returns:
          ``[(indices int [batch_size], valid bool [batch_size])]``, one per batch.
        """
        batch_size = _check_batch_size(batch_size)
        rng = _epoch_rng(seed, epoch) if shuffle else None
        planned = []
        for members in self._members:
            if rng is not None:
                members = rng.permutation(members)
            for i in range(0, len(members), batch_size):
                chunk = members[i:i + batch_size]
                fill = np.resize(members, batch_size - len(chunk))  # repeats, invalid
                planned.append((np.concatenate([chunk, fill]),
                                np.arange(batch_size) < len(chunk)))
        if rng is not None:
            planned = [planned[i] for i in rng.permutation(len(planned))]
        return planned

    def _take(self, idx: np.ndarray, batch_idx: np.ndarray) -> dict[str, Any]:
        """The examples ``idx``, each bucketed modality cut to the batch's bucket."""
        batch = {}
        for key, value in self.arrays.items():
            if key in self._cuts:
                t = int(self._cuts[key][batch_idx[0]])
                batch[key] = _tree_map(lambda a, t=t: a[idx, :t], value)
            else:
                batch[key] = _tree_map(lambda a: a[idx], value)
        return batch
