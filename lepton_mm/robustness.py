"""Robustness evaluation: absent modalities, input noise, MultiBench's robustness scores.

Tools for testing a trained model on imperfect data:

* ``mark_absent`` marks whole modalities absent in a batch, through the batch format's
  ``present`` flags (the model masks them out; no zeros are fed as data).
* ``add_gaussian_noise`` corrupts an input (e.g. images) with seeded white Gaussian
  noise whose draw per example does not depend on the batch it is in.
* ``ConditionEvaluator`` computes a trained ``MultimodalClassifier``'s predictions and
  accuracy under many such conditions, running each encoder once per distinct input.
* ``relative_robustness`` and ``effective_robustness`` summarise an accuracy curve over
  increasing imperfection as MultiBench does; ``minmax_normalize`` is its final
  normalisation across methods; ``summarize_sweeps`` applies all three to curves over
  methods and seeds, and ``plot_sweep`` draws them.

Everything but ``ConditionEvaluator`` is a pure function. Importing this module does not
import Flax or ``lepton_mm.models`` (``ConditionEvaluator`` imports them when it is
constructed), and nothing here imports the training code: batches are dicts of arrays
(numpy or JAX), curves are sequences of floats.

References:
  Liang, Lyu, Fan, Wu, Cheng, Wu, Chen, Wu, Lee, Zhu, Salakhutdinov and Morency,
  "MultiBench: Multiscale Benchmarks for Multimodal Representation Learning", NeurIPS
  2021 Datasets and Benchmarks; code ``pliang279/MultiBench``,
  ``eval_scripts/robustness.py`` (the two scores and their normalisation) and
  ``robustness/`` (the noise functions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from lepton_mm._validation import check_positive_int
from lepton_mm.types import RESERVED_KEYS

if TYPE_CHECKING:
    from lepton_mm.models import MultimodalClassifier

__all__ = [
    "ConditionEvaluator",
    "add_gaussian_noise",
    "effective_robustness",
    "mark_absent",
    "minmax_normalize",
    "plot_sweep",
    "relative_robustness",
    "summarize_sweeps",
]

Array = jax.Array

# The batch keys that are not modalities: ``lepton_mm.models.RESERVED_KEYS`` (repeated
# here so that this module does not import Flax; tests/test_robustness.py checks it).


# ------------------------------------------------------------------------- absence


def _batch_size(batch: Mapping[str, Any], modality: str) -> int:
    leaves = jax.tree_util.tree_leaves(batch[modality])
    if not leaves or np.ndim(leaves[0]) == 0:
        raise ValueError(f"batch[{modality!r}]: expected arrays with a leading batch axis, "
                         f"got {batch[modality]!r}.")
    return int(np.shape(leaves[0])[0])


def mark_absent(batch: Mapping[str, Any], modalities: str | Iterable[str]) -> dict[str, Any]:
    """A copy of ``batch`` in which ``modalities`` are absent for every example.

    Absence goes through the batch format's flags: ``present[m]`` becomes bool
    ``[batch]`` all False, so ``MultimodalClassifier`` AND-s it into the encoder's mask
    and zeroes that modality's tokens and pooled features before fusion. The data of
    the modality is left in place (the encoder still runs: shapes stay static and
    nothing recompiles). Other modalities keep their ``present`` flags.

    Args:
      batch: a batch dict (``lepton_mm.models``): modality name -> array or tuple of
        arrays with a leading ``[batch]`` axis, plus optional ``"label"``, ``"present"``
        (modality -> bool ``[batch]``) and ``"valid"``.
      modalities: a modality name or several; each must be a modality key of ``batch``.

    Returns:
      A new dict: the same arrays (not copied) and a new ``"present"`` dict with
      ``present[m] = numpy bool [batch]`` of False for each ``m`` in ``modalities``.
      ``batch`` is not modified.

    Raises:
      TypeError: ``batch`` is not a mapping, or ``present`` is not a mapping.
      ValueError: a name is not a modality of ``batch`` (the error lists the ones it
        has), or is a reserved key.

    Examples:
      >>> import numpy as np
      >>> batch = {"image": np.zeros((3, 2, 2, 1)), "audio": (np.zeros((3, 5, 4)),
      ...          np.ones((3, 5), bool)), "label": np.arange(3)}
      >>> out = mark_absent(batch, "audio")
      >>> out["present"]["audio"].tolist(), "present" in batch
      ([False, False, False], False)
      >>> mark_absent(batch, ["text"])
      Traceback (most recent call last):
      ...
      ValueError: Unrecognized modality: 'text'. The batch has modalities ['audio', 'image'].
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch: expected a dict modality name -> arrays, got "
                        f"{type(batch).__name__}.")
    names = [modalities] if isinstance(modalities, str) else list(modalities)
    known = sorted(k for k in batch if k not in RESERVED_KEYS)
    for m in names:
        if m in RESERVED_KEYS:
            raise ValueError(f"Unrecognized modality: {m!r} is a reserved batch key "
                             f"({list(RESERVED_KEYS)}). The batch has modalities {known}.")
        if m not in batch:
            raise ValueError(f"Unrecognized modality: {m!r}. The batch has modalities "
                             f"{known}.")
    present = batch.get("present") or {}
    if not isinstance(present, Mapping):
        raise TypeError(f"batch['present']: expected a dict modality -> bool [batch], got "
                        f"{type(present).__name__}.")
    present = dict(present)
    for m in names:
        present[m] = np.zeros(_batch_size(batch, m), bool)
    return {**batch, "present": present}


# -------------------------------------------------------------------------- noise


def add_gaussian_noise(x: Array | np.ndarray, sigma: float, *, key: Array,
                       example_index: Array | np.ndarray | None = None) -> Array:
    """``x + sigma * N(0, 1)``: additive white Gaussian noise, seeded per example.

    Row ``i`` draws its noise from ``fold_in(key, example_index[i])``, so an example
    gets the same noise whatever batch or subset it is evaluated in, and the same
    standard-normal draw at every ``sigma`` (a sweep over ``sigma`` scales one noise
    pattern, which makes the accuracy curve smooth). Values are not clipped.

    Args:
      x: float ``[batch, ...]``, e.g. images ``[batch, height, width, channels]``.
      sigma: noise standard deviation (>= 0), in the units of ``x``.
      key: a PRNG key (``jax.random.key(seed)``); the caller owns the seed.
      example_index: int ``[batch]``, the examples' positions in their dataset
        (default ``arange(batch)``).

    Returns:
      float ``[batch, ...]`` with the dtype of ``x``.

    Raises:
      ValueError: negative or non-finite ``sigma``, or ``example_index`` not ``[batch]``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.zeros((2, 3))
      >>> noisy = add_gaussian_noise(x, 0.5, key=jax.random.key(0))
      >>> noisy.shape, bool(jnp.all(add_gaussian_noise(x, 0.0, key=jax.random.key(0)) == x))
      ((2, 3), True)
      >>> row = add_gaussian_noise(x[1:], 0.5, key=jax.random.key(0), example_index=[1])
      >>> bool(jnp.all(row == noisy[1:]))  # example 1 gets the same noise on its own
      True
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim == 0:
        raise ValueError(f"x: expected a float array with a leading batch axis, got dtype "
                         f"{x.dtype} shape {x.shape}.")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.floating,
                                                         np.integer)):
        raise TypeError(f"sigma: expected a number, got {type(sigma).__name__}.")
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma: expected a finite number >= 0, got {sigma!r}.")
    index = (jnp.arange(x.shape[0]) if example_index is None
             else jnp.asarray(example_index))
    if index.shape != (x.shape[0],) or not jnp.issubdtype(index.dtype, jnp.integer):
        raise ValueError(f"example_index: expected int [{x.shape[0]}], got dtype "
                         f"{index.dtype} shape {index.shape}.")
    return _noisy(x, jnp.asarray(sigma, x.dtype), key, index.astype(jnp.int32))


@jax.jit
def _noisy(x: Array, sigma: Array, key: Array, index: Array) -> Array:
    def one(i):
        return jax.random.normal(jax.random.fold_in(key, i), x.shape[1:], x.dtype)

    return x + sigma * jax.vmap(one)(index)


# ---------------------------------------------------------------------- evaluation


class ConditionEvaluator:
    """A trained classifier's predictions under many test conditions, encoders run once.

    ``predictions(batch)`` equals ``argmax(model(batch), -1)`` and ``accuracy(batch)``
    its agreement with ``batch["label"]``, for every condition the batch format can
    express: ``batch["present"]`` is honoured exactly as the model does (an absent
    modality's ``EncoderOutput`` goes through ``lepton_mm.models.apply_presence``
    before the fusion layer), and noisy inputs are just other arrays. The work is split
    as the model computes it, encoders then fusion and head, so that each encoder runs
    once per input array: an encoder's output for an array object already seen is
    reused. A sweep over image noise re-runs only the image encoder; marking a modality
    absent (``mark_absent`` keeps the arrays) re-runs no encoder at all. Examples are
    processed ``batch_size`` at a time, the last chunk padded with repeats, so nothing
    recompiles between conditions of the same shapes.

    The model is captured at construction: later changes to its parameters are not seen,
    and it is evaluated in eval mode (dropout off, batch norm on running statistics)
    without switching the caller's model. Inputs are recognised by object identity, so
    an array must not be modified in place between calls; the encodings are kept for
    the evaluator's lifetime (about ``n * (time * dim + dim)`` floats per input array).

    Shapes: ``batch`` is a batch dict (``lepton_mm.models``) of ``n`` examples with
    every modality the model encodes; predictions are int32 ``[n]``.

    Args:
      model: a ``MultimodalClassifier`` whose head outputs class logits
        ``[batch, num_classes]``.
      batch_size: examples per compiled call (the memory / speed trade-off).

    Raises:
      TypeError: ``model`` is not a ``MultimodalClassifier``.
      ValueError: ``batch_size`` is not a positive int.

    Examples:
      >>> import numpy as np
      >>> from flax import nnx
      >>> from lepton_mm.encoders import AudioSpectrogramCNN, ImageCNN
      >>> from lepton_mm.fusion import build
      >>> from lepton_mm.models import MultimodalClassifier
      >>> rngs = nnx.Rngs(0)
      >>> model = MultimodalClassifier(
      ...     {"image": ImageCNN(1, dim=8, widths=(4,), rngs=rngs),
      ...      "audio": AudioSpectrogramCNN(8, dim=8, widths=(4,), rngs=rngs)},
      ...     build("concat", {"image": 8, "audio": 8}, 6, rngs=rngs),
      ...     nnx.Linear(6, 3, rngs=rngs))
      >>> batch = {"image": np.ones((5, 6, 6, 1), np.float32),
      ...          "audio": (np.ones((5, 10, 8), np.float32), np.ones((5, 10), bool)),
      ...          "label": np.zeros(5, np.int32)}
      >>> evaluator = ConditionEvaluator(model, batch_size=4)
      >>> evaluator.predictions(batch).shape
      (5,)
      >>> no_audio = evaluator.accuracy(mark_absent(batch, "audio"))  # no encoder re-runs
    """

    def __init__(self, model: MultimodalClassifier, batch_size: int):
        from flax import nnx

        from lepton_mm.models import MultimodalClassifier, apply_presence, encode_modalities

        if not isinstance(model, MultimodalClassifier):
            raise TypeError(f"model: expected a MultimodalClassifier, got "
                            f"{type(model).__name__}.")
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.modalities = model.modalities
        copy = nnx.merge(*nnx.split(model))  # shares the arrays; eval() leaves model alone
        copy.eval()
        graphdef, state = nnx.split(copy)
        self._state = nnx.as_pure(state)
        # (modality, input leaves' ids) -> (the leaves, kept alive so no id is reused;
        # the encoder outputs as numpy arrays).
        self._cache: dict[tuple[str, tuple[int, ...]], tuple[list[Any], Any]] = {}

        def encode(state, inputs, modality):
            m = nnx.merge(graphdef, state)
            return encode_modalities(m.encoders, {modality: inputs}, (modality,))[modality]

        def classify(state, encoded, present):
            m = nnx.merge(graphdef, state)
            encoded = {k: apply_presence(v, present.get(k)) for k, v in encoded.items()}
            return jnp.argmax(m.head(m.fusion(encoded)), axis=-1)

        self._encode = jax.jit(encode, static_argnames="modality")
        self._classify = jax.jit(classify)

    def _chunked(self, fn: Callable[[Any], Any], tree: Any, n: int) -> Any:
        """``fn`` over ``tree``'s ``n`` rows, ``batch_size`` at a time; numpy results."""
        out = []
        for i in range(0, n, self.batch_size):
            rows = np.arange(i, i + self.batch_size) % n  # pad with repeats
            out.append(jax.device_get(fn(jax.tree.map(lambda a, r=rows: a[r], tree))))
        return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *out)

    def _encoded(self, modality: str, inputs: Any, n: int) -> Any:
        leaves = jax.tree_util.tree_leaves(inputs)
        key = (modality, tuple(id(leaf) for leaf in leaves))
        hit = self._cache.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[0], leaves, strict=True)):
            hit = (leaves, self._chunked(
                lambda x: self._encode(self._state, x, modality=modality), inputs, n))
            self._cache[key] = hit
        return hit[1]

    def predictions(self, batch: Mapping[str, Any]) -> np.ndarray:
        """The predicted classes: ``argmax(model(batch), -1)``, computed in chunks.

        Args:
          batch: a batch dict (``lepton_mm.models``) of ``n >= 1`` examples with every
            modality the model encodes and an optional ``"present"``; ``"label"`` is
            not read.

        Returns:
          numpy int32 ``[n]``.

        Raises:
          ValueError: a modality is missing, sizes disagree, or ``n`` is 0.
        """
        from lepton_mm.models.classifier import check_batch

        n = check_batch(batch, self.modalities, who=type(self).__name__)
        if n == 0:
            raise ValueError("batch: expected at least one example, got 0.")
        present = batch.get("present") or {}
        tree = {"encoded": {m: self._encoded(m, batch[m], n) for m in self.modalities},
                "present": {m: np.asarray(present[m]) for m in self.modalities
                            if m in present}}
        return self._chunked(
            lambda t: self._classify(self._state, t["encoded"], t["present"]), tree, n)

    def accuracy(self, batch: Mapping[str, Any]) -> float:
        """Fraction of ``batch``'s examples whose prediction equals ``batch["label"]``.

        Args:
          batch: as for ``predictions``, with ``"label"``: int ``[n]`` class indices.

        Returns:
          The accuracy, a float in [0, 1].

        Raises:
          ValueError: no ``"label"``, or labels that are not ``[n]``.
        """
        if "label" not in batch:
            raise ValueError("batch: expected a 'label' entry to compute accuracy.")
        labels = np.asarray(batch["label"])
        preds = self.predictions(batch)
        if labels.shape != preds.shape:
            raise ValueError(f"batch['label']: expected shape {preds.shape}, got "
                             f"{labels.shape}.")
        return float(np.mean(preds == labels))

    def evaluate(self, test: Mapping[str, Any], *, absent: Sequence[str] = (),
                 sweeps: Mapping[str, tuple[str, Sequence[Any]]] | None = None,
                 progress: bool | None = None) -> dict[str, Any]:
        """Accuracy on a test split as given, with modalities absent, and along sweeps.

        Args:
          test: a batch dict of ``n`` examples with ``"label"`` int ``[n]``.
          absent: modalities to mark absent (``mark_absent``), one at a time.
          sweeps: name -> ``(modality, inputs per level)``: the split with that
            modality's input replaced by each level's (e.g. noisier images).
          progress: a tqdm bar over the conditions (None: when stdout is a terminal).

        Returns:
          ``{"clean": accuracy, "<modality>_absent": accuracy, <sweep name>: [accuracy
          per level], "predictions": the clean condition's int32 [n]}``.
        """
        import sys

        from tqdm import tqdm

        conditions: list[tuple[str, int | None, Mapping[str, Any]]] = [("clean", None, test)]
        conditions += [(f"{m}_absent", None, mark_absent(test, m)) for m in absent]
        for name, (modality, levels) in (sweeps or {}).items():
            conditions += [(name, i, {**test, modality: x}) for i, x in enumerate(levels)]
        labels = np.asarray(test["label"])
        out: dict[str, Any] = {name: [None] * len(levels)
                               for name, (_, levels) in (sweeps or {}).items()}
        show = sys.stdout.isatty() if progress is None else progress
        for name, i, batch in tqdm(conditions, desc="robustness", leave=False,
                                   disable=not show, dynamic_ncols=True):
            predictions = self.predictions(batch)
            if name == "clean":
                out["predictions"] = predictions
            acc = float(np.mean(predictions == labels))
            if i is None:
                out[name] = acc
            else:
                out[name][i] = acc
        return out


# ------------------------------------------------------------------------ scores


def _curve(name: str, values: Sequence[float]) -> np.ndarray:
    curve = np.asarray(values, np.float64)
    if curve.ndim != 1 or curve.size < 2:
        raise ValueError(f"{name}: expected a 1-D curve of at least 2 levels, got shape "
                         f"{curve.shape}.")
    if not np.all(np.isfinite(curve)):
        raise ValueError(f"{name}: expected finite values, got {curve.tolist()}.")
    return curve


def relative_robustness(accuracy: Sequence[float], *, spacing: float | None = None) -> float:
    """MultiBench's relative robustness: the area under the accuracy-imperfection curve.

    ``sum_i (a[i] + a[i+1]) * spacing / 2`` (the trapezoidal rule), with the levels
    ordered from least to most imperfect and equally spaced ``spacing`` apart.
    MultiBench (``relative_robustness_helper`` in ``eval_scripts/robustness.py``) uses
    11 noise levels 0, 0.1, ..., 1 and ``spacing = 0.1``; the default here,
    ``1 / (levels - 1)``, is that for 11 levels and in general puts the levels on
    [0, 1], so the score is the mean accuracy over the sweep (in [0, 1] for accuracies
    in [0, 1]) whatever the number of levels.

    Args:
      accuracy: float ``[levels]`` (>= 2), e.g. test accuracy at each noise level.
      spacing: distance between consecutive levels (default ``1 / (levels - 1)``).

    Returns:
      The area, a float. Higher is more robust.

    Examples:
      >>> relative_robustness([1.0, 0.5, 0.0])  # levels at 0, 0.5, 1
      0.5
      >>> round(relative_robustness([0.8, 0.6, 0.4, 0.2], spacing=0.1), 6)  # MultiBench's
      0.15
    """
    curve = _curve("accuracy", accuracy)
    step = 1.0 / (curve.size - 1) if spacing is None else float(spacing)
    if not math.isfinite(step) or step <= 0:
        raise ValueError(f"spacing: expected a positive number, got {spacing!r}.")
    return float(np.sum((curve[:-1] + curve[1:]) * step / 2))


def effective_robustness(accuracy: Sequence[float], reference: Sequence[float]) -> float:
    """MultiBench's effective robustness: accuracy beyond a baseline shifted to match.

    The baseline curve (MultiBench: late fusion, "LF") is shifted so that it starts at
    the method's accuracy, ``beta = reference + (accuracy[0] - reference[0])``, and the
    score is ``sum_l (accuracy[l] - beta[l])``: how much less (positive) or more
    (negative) the method loses than the baseline as imperfection grows, independent of
    their clean accuracies. The reference itself scores 0. This is
    ``effective_robustness_helper`` in MultiBench's ``eval_scripts/robustness.py``
    (a sum over levels, not a mean; level 0 always contributes 0).

    Args:
      accuracy: float ``[levels]`` (>= 2), the method's curve, least imperfect first.
      reference: float ``[levels]``, the baseline's curve at the same levels.

    Returns:
      A float; positive means more robust than the baseline.

    Raises:
      ValueError: curves of different lengths, shorter than 2, or not finite.

    Examples:
      >>> round(effective_robustness([0.9, 0.8, 0.6], [0.8, 0.6, 0.3]), 6)  # beta: .9 .7 .4
      0.3
      >>> effective_robustness([0.8, 0.6, 0.3], [0.8, 0.6, 0.3])
      0.0
    """
    f = _curve("accuracy", accuracy)
    lf = _curve("reference", reference)
    if f.shape != lf.shape:
        raise ValueError(f"reference: expected {f.size} levels like accuracy, got {lf.size}.")
    beta = lf + (f[0] - lf[0])
    return float(np.sum(f - beta))


def minmax_normalize(scores: Mapping[str, float], *,
                     higher_is_better: bool = True) -> dict[str, float]:
    """Scores rescaled to [0, 1] across methods: ``(s - min) / (max - min)``.

    MultiBench reports each robustness score normalised this way over the methods
    compared on a task (``maxmin_normalize`` in ``eval_scripts/robustness.py``; scores
    where lower is better are negated first). A normalised score is only meaningful
    relative to the set of methods it was computed over.

    Args:
      scores: method name -> raw score.
      higher_is_better: False negates the scores first (errors, losses).

    Returns:
      Method name -> normalised score; NaN for every method when all scores are equal
      (0 / 0, as in MultiBench), and for a single method.

    Examples:
      >>> minmax_normalize({"a": 0.25, "b": 0.75, "c": 0.5})
      {'a': 0.0, 'b': 1.0, 'c': 0.5}
    """
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError(f"scores: expected a non-empty dict method -> score, got "
                         f"{scores!r}.")
    values = np.array([float(v) for v in scores.values()], np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"scores: expected finite values, got {dict(scores)}.")
    if not higher_is_better:
        values = -values
    span = values.max() - values.min()
    if span == 0:
        return {k: math.nan for k in scores}
    return {k: float(v) for k, v in zip(scores, (values - values.min()) / span, strict=True)}


# ------------------------------------------------------------------ over methods/seeds


def summarize_sweeps(curves: Mapping[str, Mapping[str, Sequence[float]]],
                     levels: Sequence[float], *,
                     reference: str | None = None) -> dict[str, dict[str, Any]]:
    """One sweep's accuracy curves over methods and seeds, with MultiBench's scores.

    Args:
      curves: method -> seed name -> accuracies at ``levels`` (least imperfect first).
      levels: the sweep's levels, for the summary.
      reference: the method effective robustness is measured against (its mean curve);
        None or absent from ``curves``: no effective robustness.

    Returns:
      Method -> ``{"levels", "mean", "std" (sample std per level; None for one seed),
      "per_seed", "relative_robustness", "effective_robustness"}`` (each score as
      ``{"mean", "std", "per_seed"}`` over the seeds' curves, or None) and
      ``"<score>_normalized"``: ``minmax_normalize`` of the scores' means over the
      methods (None where undefined: one method, all equal, or no score).
    """
    from lepton_mm.experiment import seed_stats

    out: dict[str, dict[str, Any]] = {}
    for method, per_seed in curves.items():
        x = np.array([list(c) for c in per_seed.values()], np.float64)  # [seeds, levels]
        if x.shape[1] != len(levels):
            raise ValueError(f"curves[{method!r}]: expected {len(levels)} accuracies per "
                             f"seed (one per level), got {x.shape[1]}.")
        out[method] = {"levels": list(levels), "mean": x.mean(0).tolist(),
                       "std": x.std(0, ddof=1).tolist() if len(x) > 1 else None,
                       "per_seed": {k: list(c) for k, c in per_seed.items()}}
    ref = out[reference]["mean"] if reference in out else None
    for s in out.values():
        s["relative_robustness"] = seed_stats(
            {k: relative_robustness(c) for k, c in s["per_seed"].items()})
        s["effective_robustness"] = None if ref is None else seed_stats(
            {k: effective_robustness(c, ref) for k, c in s["per_seed"].items()})
    for score in ("relative_robustness", "effective_robustness"):
        means = {m: s[score]["mean"] for m, s in out.items() if s[score] is not None}
        normalized = minmax_normalize(means) if means else {}
        for m, s in out.items():
            value = normalized.get(m)
            s[f"{score}_normalized"] = None if value is None or math.isnan(value) else value
    return out


def plot_sweep(sweep: Mapping[str, Mapping[str, Any]], path: Any, *, xlabel: str,
               title: str, invert_x: bool = False, mark: tuple[float, str] | None = None,
               group: Callable[[str], tuple[str, bool]] | None = None) -> Any:
    """A sweep's accuracy curves as a PNG: a line per method, error bars = std over seeds.

    Args:
      sweep: method -> ``{"levels", "mean", "std"}`` (``summarize_sweeps``' entries).
      path: the PNG to write.
      xlabel: the x-axis label.
      title: the plot's title.
      invert_x: draw the levels decreasing (e.g. SNR: noisier to the right).
      mark: ``(level, label)`` of a dotted vertical line (e.g. the training SNR).
      group: method -> ``(base, variant)``: a variant is drawn in its base's colour,
        dashed (the first variant name seen), dotted, dash-dotted, ... (the others).

    Returns:
      ``path`` as a ``pathlib.Path``.
    """
    from pathlib import Path

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)  # an Agg canvas on a bare Figure: no pyplot state
    ax = fig.add_subplot()
    colours: dict[str, Any] = {}
    cycle = ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))
    styles: dict[Any, Any] = {}
    for method, curve in sweep.items():
        base, variant = group(method) if group else (method, False)
        style = styles.setdefault(variant, cycle[len(styles) % len(cycle)]) if variant \
            else "-"
        err = None if curve["std"] is None else 100 * np.array(curve["std"])
        line = ax.errorbar(curve["levels"], 100 * np.array(curve["mean"]), yerr=err,
                           marker="o", markersize=3, capsize=3, label=method,
                           linestyle=style, color=colours.get(base))
        colours.setdefault(base, line.lines[0].get_color())
    if invert_x:
        ax.invert_xaxis()
    if mark is not None:
        ax.axvline(mark[0], color="grey", linestyle=":", linewidth=1, label=mark[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)
