"""MUStARD text: sarcasm detection with all-MiniLM-L6-v2 on the official folds.

The benchmark is ``lepton_mm.data.load_mustard`` (690 sitcom utterances, half of them
sarcastic, each with its dialogue context) in the paper's speaker-dependent setup: its
five official folds, scored by weighted F1 (Castro et al. 2019). Three text-only methods:

  frozen_head     the utterance's MiniLM sentence embedding (frozen) -> MLP head
  finetune        ``TextTransformer`` initialised from MiniLM and fine-tuned with the head
                  (text tower at a ~30x lower learning rate; embedding tables frozen)
  context_fusion  utterance and dialogue context as two modalities (frozen MiniLM
                  embeddings; the context's sentences are its tokens) -> fusion layer
                  (``concat`` by default) -> the same head

Hyperparameters are the ``MUStARDConfig`` defaults, fixed before any run. A stratified
validation slice (15 %) of each fold's training part picks the epoch (lowest validation
loss; ``--monitor weighted_f1``: highest validation weighted F1); the test fold is only
scored, and the summary also reports what the other rule would have picked. Per
(method, fold, seed) the run lives in ``WORKDIR/<method>/fold_<k>/seed_<s>/result.json``
(indices, test predictions, per-epoch history); the summary, mean and sample std over
folds of the seed-averaged fold scores, goes to ``WORKDIR/results.json`` and
``WORKDIR/results.md``, beside a majority-class baseline and the paper's numbers.
Re-running a command skips finished runs.

    python experiments/mustard.py --quick --workdir runs/mustard_quick   # ~1 min, CPU
    python experiments/mustard.py --workdir runs/mustard                 # 5 folds, all
    python experiments/mustard.py --methods frozen_head,context_fusion --seeds 0,1,2

References:
  Castro et al., "Towards Multimodal Sarcasm Detection (An _Obviously_ Perfect Paper)",
  ACL 2019. https://arxiv.org/abs/1906.01815
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from lepton_mm.types import EncoderOutput

METHODS = ("frozen_head", "finetune", "context_fusion")
NUM_CLASSES = 2
#: Castro et al. 2019, speaker-dependent setup, weighted F1 (approximate, in %).
PAPER = {"text_only": 65.0, "text_audio_video": 72.0}
_VAL_TAG = 7  # numpy seed tag of the validation slice
_MIN_BUCKET = 16  # shortest padded text length (as SentenceEncoder)


@dataclasses.dataclass(frozen=True)
class MUStARDConfig:
    """Everything the experiment needs (``quick_config()`` for the fast variant).

    Attributes:
      methods: names in ``METHODS``; empty means all of them.
      seeds: training seeds (initialisation, dropout, shuffling).
      folds: which of the five official folds to run.
      workdir: root of the runs and the summary.
      val_fraction: share of each fold's training part held out (stratified) to pick
        the epoch; the same slice for every seed.
      head_hidden: width of the head's hidden layer (the fusion output for
        ``context_fusion``).
      head_dropout: dropout on the head's (or the fusion's) input features.
      weight_decay: AdamW decoupled weight decay (not on biases and norm scales).
      head_epochs, head_batch_size, head_learning_rate: the frozen-feature methods
        (AdamW, constant rate).
      finetune_epochs, finetune_batch_size: fine-tuning.
      text_learning_rate: peak rate of the text tower (cosine decay, linear warmup over
        ``warmup_fraction`` of the steps; gradients clipped to global norm 1).
      finetune_head_learning_rate: peak rate of the head while fine-tuning.
      freeze_embeddings: keep the word/position/segment tables fixed (469 training
        sentences cannot fit a 30522 x 384 table; decoupled decay would shrink it).
      freeze_layers: also freeze the lowest this many transformer blocks.
      max_tokens: utterances are truncated to this many word pieces (99 % of them fit
        in 64); batches are padded to 16, 32 or 64 by length bucket.
      eval_batch_size: batch size of validation and test passes.
      context_fusion: a name in ``lepton_mm.fusion.FUSIONS``.
      monitor: the validation quantity that picks the epoch: ``"loss"`` (lowest
        cross-entropy, the rule fixed before the runs) or ``"weighted_f1"`` (highest).
      finetune_max_train: use only this many training examples to fine-tune (quick).
      progress: tqdm bars (None: when stdout is a terminal).
      quick: set by ``quick_config``.
    """

    methods: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    workdir: str = "runs/mustard"
    val_fraction: float = 0.15
    head_hidden: int = 128
    head_dropout: float = 0.1
    weight_decay: float = 0.01
    head_epochs: int = 40
    head_batch_size: int = 32
    head_learning_rate: float = 1e-3
    finetune_epochs: int = 5
    finetune_batch_size: int = 16
    text_learning_rate: float = 3e-5
    finetune_head_learning_rate: float = 1e-3
    warmup_fraction: float = 0.1
    freeze_embeddings: bool = True
    freeze_layers: int = 0
    max_tokens: int = 64
    eval_batch_size: int = 64
    context_fusion: str = "concat"
    monitor: str = "loss"
    finetune_max_train: int | None = None
    progress: bool | None = None
    quick: bool = False

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "folds", tuple(int(f) for f in self.folds))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct seeds, got {list(self.seeds)}.")
        if not self.folds or len(set(self.folds)) != len(self.folds) or \
                not all(0 <= f < 5 for f in self.folds):
            raise ValueError(f"folds: expected distinct folds in 0..4, got "
                             f"{list(self.folds)}.")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction: expected a number in (0, 0.5), got "
                             f"{self.val_fraction!r}.")
        if self.monitor not in ("loss", "weighted_f1"):
            raise ValueError(f"monitor: expected 'loss' or 'weighted_f1', got "
                             f"{self.monitor!r}.")
        if not _MIN_BUCKET <= self.max_tokens <= 512:
            raise ValueError(f"max_tokens: expected {_MIN_BUCKET}..512, got "
                             f"{self.max_tokens!r}.")


def quick_config(**overrides: Any) -> MUStARDConfig:
    """``--quick``: 2 folds, one seed, short training, a small fine-tuning subset."""
    base = dict(folds=(0, 1), seeds=(0,), head_epochs=15, finetune_epochs=1,
                finetune_max_train=48, max_tokens=16, quick=True)
    return MUStARDConfig(**{**base, **overrides})


def resolve_methods(config: MUStARDConfig) -> list[str]:
    """The methods to run, validated (before any computation)."""
    from lepton_mm.fusion import FUSIONS

    if config.context_fusion not in FUSIONS:
        raise ValueError(f"Unrecognized fusion: {config.context_fusion!r}. Known: "
                         f"{sorted(FUSIONS)}.")
    if not config.methods or config.methods == ("all",):
        return list(METHODS)
    for m in config.methods:
        if m not in METHODS:
            raise ValueError(f"Unrecognized method: {m!r}. Known: {list(METHODS)} "
                             "(or 'all').")
    return list(dict.fromkeys(config.methods))


# ------------------------------------------------------------------------------- data


def fold_split(labels: np.ndarray, train: np.ndarray, test: np.ndarray, fold: int,
               val_fraction: float) -> dict[str, np.ndarray]:
    """Splits an official fold's training part into train and a stratified validation slice.

    Args:
      labels: bool or int ``[num_examples]``.
      train: int ``[num_train]``, the fold's official training indices.
      test: int ``[num_test]``, its official test indices (returned unchanged).
      fold: the fold number (seeds the validation draw, so every seed sees one slice).
      val_fraction: share of each class's training examples held out.

    Returns:
      ``{"train", "val", "test"}``: sorted int64 index arrays, pairwise disjoint.
    """
    rng = np.random.default_rng([fold, _VAL_TAG])
    val = []
    for c in np.unique(labels[train]):
        members = train[labels[train] == c]
        val.append(rng.choice(members, round(val_fraction * len(members)), replace=False))
    val = np.sort(np.concatenate(val))
    return {"train": np.setdiff1d(train, val), "val": val, "test": np.asarray(test)}


def majority_scores(labels: np.ndarray, train: np.ndarray,
                    test: np.ndarray) -> dict[str, float]:
    """Weighted F1 and accuracy of predicting the training part's majority class."""
    labels = labels.astype(np.int32)
    majority = int(np.bincount(labels[train], minlength=NUM_CLASSES).argmax())
    return _scores(np.full(len(test), majority, np.int32), labels[test])


def _scores(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    import jax.numpy as jnp

    from lepton_mm.metrics import precision_recall_f1

    _, _, f1 = precision_recall_f1(jnp.asarray(predictions), jnp.asarray(labels),
                                   num_classes=NUM_CLASSES, average="weighted")
    return {"weighted_f1": float(f1), "accuracy": float(np.mean(predictions == labels))}


def make_inputs(config: MUStARDConfig, methods: list[str]) -> dict[str, Any]:
    """The model inputs every method needs, computed once for all 690 utterances.

    Returns:
      ``{"label": int32 [690]}`` plus, as needed, ``"tokens"``: the utterances' word
      piece ids int32 ``[690, max_tokens]`` and bool mask; ``"utterance_embedding"``:
      float32 ``[690, 1, 384]`` L2-normalised MiniLM sentence embeddings and a mask;
      ``"context_embedding"``: float32 ``[690, 11, 384]``, one row per context sentence,
      and its bool mask ``[690, 11]``.
    """
    from lepton_mm.data import load_mustard
    from lepton_mm.pretrained import SentenceEncoder

    mustard = load_mustard()
    encoder = SentenceEncoder.from_pretrained()
    out: dict[str, Any] = {"label": mustard.labels.astype(np.int32),
                           "folds": mustard.folds}
    if "finetune" in methods:
        ids = SentenceEncoder(encoder.model, encoder.tokenizer,
                              max_seq_length=config.max_tokens).tokenize(mustard.utterances)
        tokens = np.zeros((len(ids), config.max_tokens), np.int32)
        mask = np.zeros(tokens.shape, bool)
        for i, row in enumerate(ids):
            tokens[i, :len(row)] = row
            mask[i, :len(row)] = True
        out["tokens"] = (tokens, mask)
    if {"frozen_head", "context_fusion"} & set(methods):
        emb = encoder.encode(mustard.utterances, progress=_progress(config))
        out["utterance_embedding"] = (emb[:, None], np.ones((len(emb), 1), bool))
    if "context_fusion" in methods:
        flat = [s for c in mustard.contexts for s in c]
        emb = encoder.encode(flat, progress=_progress(config))
        width = max(len(c) for c in mustard.contexts)
        context = np.zeros((len(mustard.contexts), width, emb.shape[1]), np.float32)
        mask = np.zeros(context.shape[:2], bool)
        start = 0
        for i, c in enumerate(mustard.contexts):
            context[i, :len(c)] = emb[start:start + len(c)]
            mask[i, :len(c)] = True
            start += len(c)
        out["context_embedding"] = (context, mask)
    return out


def method_inputs(inputs: dict[str, Any], method: str) -> dict[str, tuple[Any, Any]]:
    """``{modality: (features or token ids, mask)}`` that ``method``'s model encodes."""
    if method == "finetune":
        return {"utterance": inputs["tokens"]}
    out = {"utterance": inputs["utterance_embedding"]}
    if method == "context_fusion":
        out["context"] = inputs["context_embedding"]
    return out


# ---------------------------------------------------------------------------- batching


def _bucket(length: int, cap: int) -> int:
    """Next power of two >= ``length`` (at least 16), capped at ``cap``."""
    return min(max(_MIN_BUCKET, 1 << (max(int(length), 1) - 1).bit_length()), cap)


def _length_keys(modalities: dict[str, tuple[Any, Any]], idx: np.ndarray) -> np.ndarray:
    """int ``[len(idx)]``: one id per combination of the modalities' length buckets."""
    columns = [np.array([_bucket(n, mask.shape[1]) for n in mask[idx].sum(1)])
               for _, mask in modalities.values()]
    _, keys = np.unique(np.stack(columns, 1), axis=0, return_inverse=True)
    return keys.reshape(-1)


def plan_batches(keys: np.ndarray, batch_size: int,
                 rng: np.random.Generator | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Fixed-size batches that never mix length buckets.

    Args:
      keys: int ``[n]``, the length bucket of each example.
      batch_size: rows per batch; a bucket's last, partial batch is filled up with
        repeats of its own rows, marked invalid.
      rng: shuffles examples within buckets and the order of the batches; None keeps
        the order.

    Returns:
      ``[(positions int [batch_size], valid bool [batch_size])]``, positions into ``keys``.
    """
    batches = []
    for key in np.unique(keys):
        members = np.flatnonzero(keys == key)
        if rng is not None:
            members = rng.permutation(members)
        for i in range(0, len(members), batch_size):
            chunk = members[i:i + batch_size]
            fill = np.resize(members, batch_size - len(chunk))
            batches.append((np.concatenate([chunk, fill]),
                            np.arange(batch_size) < len(chunk)))
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def _take(modalities: dict[str, tuple[Any, Any]], labels: np.ndarray, idx: np.ndarray,
          valid: np.ndarray) -> dict[str, Any]:
    """The batch dict of examples ``idx``, padding trimmed to the batch's length bucket."""
    batch: dict[str, Any] = {}
    for m, (x, mask) in modalities.items():
        t = _bucket(mask[idx].sum(1).max(), mask.shape[1])
        batch[m] = (x[idx, :t], mask[idx, :t])
    batch["label"] = labels[idx]
    batch["valid"] = valid
    return batch


# ------------------------------------------------------------------------------ model


class Features(nnx.Module):
    """A parameter-free encoder of precomputed features.

    Args:
      dim: the feature size.
    """

    def __init__(self, dim: int):
        self.dim = dim

    def __call__(self, features: Any, mask: Any) -> EncoderOutput:
        """float ``[batch, time, dim]`` + bool ``[batch, time]`` -> ``EncoderOutput``
        (``pooled``: the masked mean over time)."""
        return EncoderOutput.from_tokens(features, mask)


def _head(in_dim: int, config: MUStARDConfig, rngs: Any) -> Any:
    """Dropout -> Linear(in_dim, head_hidden) -> ReLU -> Linear(head_hidden, 2)."""
    import jax

    return nnx.Sequential(nnx.Dropout(config.head_dropout, rngs=rngs),
                          nnx.Linear(in_dim, config.head_hidden, rngs=rngs), jax.nn.relu,
                          nnx.Linear(config.head_hidden, NUM_CLASSES, rngs=rngs))


def build_model(config: MUStARDConfig, method: str, rngs: Any) -> Any:
    """The ``MultimodalClassifier`` of ``method`` (all three share the head's shape).

    ``frozen_head`` and ``finetune`` put the pooled 384-d utterance vector through
    ``_head``; ``context_fusion`` replaces the head's first linear layer by the fusion
    layer (``concat``: exactly that layer on ``[utterance; mean context]``).
    """
    import jax

    from lepton_mm.fusion import FUSIONS, build
    from lepton_mm.models import MultimodalClassifier
    from lepton_mm.pretrained import load_text_transformer
    from lepton_mm.pretrained.sentence_encoder import default_model_path

    if method == "finetune":
        text, _ = load_text_transformer(default_model_path(), rngs=rngs)
        return MultimodalClassifier({"utterance": text}, None, _head(text.dim, config, rngs))
    dim = 384  # all-MiniLM-L6-v2
    if method == "frozen_head":
        return MultimodalClassifier({"utterance": Features(dim)}, None,
                                    _head(dim, config, rngs))
    encoders = {"utterance": Features(dim), "context": Features(dim)}
    kwargs = {}
    if "dropout" in inspect.signature(FUSIONS[config.context_fusion].__init__).parameters:
        kwargs["dropout"] = config.head_dropout
    fusion = build(config.context_fusion, {m: dim for m in encoders}, config.head_hidden,
                   rngs=rngs, **kwargs)
    head = nnx.Sequential(jax.nn.relu,
                          nnx.Linear(config.head_hidden, NUM_CLASSES, rngs=rngs))
    return MultimodalClassifier(encoders, fusion, head)


def is_frozen(config: MUStARDConfig, method: str, path: str) -> bool:
    """Whether the parameter at ``path`` (``param_path`` form) is frozen in ``method``."""
    return method == "finetune" and any(re.search(p, path)
                                        for p in frozen_patterns(config))


def frozen_patterns(config: MUStARDConfig) -> tuple[str, ...]:
    """Regexes of the fine-tuned text tower's frozen parameters (``param_path`` form)."""
    patterns = []
    if config.freeze_embeddings:
        patterns.append(r"^encoders/utterance/(word|position|segment)_embeddings/")
    if config.freeze_layers:
        layers = "|".join(str(i) for i in range(config.freeze_layers))
        patterns.append(rf"^encoders/utterance/layers/({layers})/")
    return tuple(patterns)


def make_tx(config: MUStARDConfig, method: str, steps: int) -> Any:
    """The optax transformation: per-group AdamW (text tower / head / frozen).

    ``lepton_mm.training.fit`` takes one ``OptimizerConfig`` (one learning rate), so the
    groups are combined here with ``optax.multi_transform`` by parameter path.

    Args:
      config: the experiment config.
      method: the method (only ``finetune`` has a text-tower group).
      steps: an upper bound on the number of training steps (the cosine's length).

    Returns:
      An ``optax.GradientTransformation`` over the model's ``nnx.Param`` state.
    """
    import jax
    import optax

    from lepton_mm.training import OptimizerConfig, make_optimizer, param_path

    if method != "finetune":
        return make_optimizer(OptimizerConfig(
            name="adamw", learning_rate=config.head_learning_rate,
            weight_decay=config.weight_decay))
    warmup = max(1, round(config.warmup_fraction * steps))

    def group(lr, clip):
        return make_optimizer(OptimizerConfig(
            name="adamw", learning_rate=lr, weight_decay=config.weight_decay,
            schedule="cosine", warmup_steps=warmup, total_steps=max(steps, warmup + 1),
            clip_norm=clip))

    def label(keypath, _):
        path = param_path(keypath)
        if is_frozen(config, method, path):
            return "frozen"
        return "text" if path.startswith("encoders/") else "head"

    return optax.multi_transform(
        {"text": group(config.text_learning_rate, 1.0),
         "head": group(config.finetune_head_learning_rate, None),
         "frozen": optax.set_to_zero()},
        lambda params: jax.tree_util.tree_map_with_path(label, params))


# -------------------------------------------------------------------------------- loop


def _progress(config: MUStARDConfig) -> bool:
    return sys.stdout.isatty() if config.progress is None else bool(config.progress)


def _epochs(config: MUStARDConfig, method: str) -> tuple[int, int]:
    """(epochs, batch size) of ``method``."""
    if method == "finetune":
        return config.finetune_epochs, config.finetune_batch_size
    return config.head_epochs, config.head_batch_size


class _Steps:
    """A method's jitted train and predict steps, compiled once and reused by every
    fold and seed (the models share one graph; only their states differ)."""

    def __init__(self, config: MUStARDConfig, method: str, model: Any, num_train: int):
        from lepton_mm.models import Classification
        from lepton_mm.training import make_eval_step, make_train_step

        epochs, batch_size = _epochs(config, method)
        # Length buckets add at most a partial batch each: 3 for the text lengths.
        steps = epochs * (-(-num_train // batch_size) + 2)
        self.tx = make_tx(config, method, steps)
        model.train()
        graphdef, _, _ = nnx.split(model, nnx.Param, ...)
        self.train = make_train_step(graphdef, self.tx, Classification(2))
        copy = nnx.clone(model)
        copy.eval()
        graphdef, _, _ = nnx.split(copy, nnx.Param, ...)
        self.predict = make_eval_step(graphdef)


def predict(steps: _Steps, params: Any, rest: Any, modalities: dict[str, Any],
            labels: np.ndarray, idx: np.ndarray, batch_size: int) -> np.ndarray:
    """float32 ``[len(idx), 2]`` eval-mode logits of examples ``idx``."""
    out = np.zeros((len(idx), NUM_CLASSES), np.float32)
    for pos, valid in plan_batches(_length_keys(modalities, idx), batch_size):
        logits = np.asarray(steps.predict(params, rest,
                                          _take(modalities, labels, idx[pos], valid)))
        out[pos[valid]] = logits[valid]
    return out


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def _better(record: dict[str, Any], best: dict[str, Any], monitor: str) -> bool:
    """Whether an epoch beats the best so far on the validation ``monitor`` (ties: the
    earlier epoch)."""
    if monitor == "loss":
        return record["val_loss"] < best["val_loss"]
    return record[f"val_{monitor}"] > best[f"val_{monitor}"]


def train_and_test(config: MUStARDConfig, method: str, seed: int, split: dict[str, Any],
                   modalities: dict[str, Any], labels: np.ndarray,
                   steps: _Steps | None) -> tuple[dict[str, Any], _Steps]:
    """Trains ``method`` on ``split["train"]`` and reports the test scores of the epoch
    that is best on ``split["val"]`` by ``config.monitor``.

    Every epoch is scored on the test fold too, and the history keeps those scores, so
    that other validation-based selection rules can be compared afterwards
    (``summarize``); no choice ever reads them.

    Returns:
      (the result dict, the jitted steps for the next fold or seed).
    """
    import jax
    from tqdm.auto import tqdm

    from lepton_mm.training import TrainState, count_params, param_path, seed_rngs

    model = build_model(config, method, seed_rngs(seed))
    if steps is None:
        steps = _Steps(config, method, model, len(split["train"]))
    model.train()
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    state = TrainState(params, rest, jax.jit(steps.tx.init)(params))
    del model
    epochs, batch_size = _epochs(config, method)
    train, val = split["train"], split["val"]
    keys = _length_keys(modalities, train)
    test = split["test"]
    history, best, step = [], None, 0
    bar = tqdm(total=epochs * len(plan_batches(keys, batch_size)),
               desc=f"{method} seed {seed}", disable=not _progress(config), leave=False)
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        losses = []
        for pos, valid in plan_batches(keys, batch_size, rng):
            batch = _take(modalities, labels, train[pos], valid)
            state, stats = steps.train(state, batch, np.int32(step))
            losses.append(stats["loss"])
            step += 1
            bar.update()
        logits = {name: predict(steps, state.params, state.rest, modalities, labels, idx,
                                config.eval_batch_size)
                  for name, idx in (("val", val), ("test", test))}
        record = {"epoch": epoch + 1, "step": step,
                  "train_loss": float(np.mean([float(x) for x in losses])),
                  "val_loss": _cross_entropy(logits["val"], labels[val])}
        for name, idx in (("val", val), ("test", test)):
            scores = _scores(logits[name].argmax(1), labels[idx])
            record.update({f"{name}_{k}": v for k, v in scores.items()})
        history.append(record)
        if best is None or _better(record, best[0], config.monitor):
            best = (record, logits["test"].argmax(1).astype(np.int32))
    bar.close()
    record, predictions = best
    params = state.params
    trainable = sum(int(np.size(v)) for kp, v in jax.tree_util.tree_flatten_with_path(
        params)[0] if not is_frozen(config, method, param_path(kp)))
    result = {
        "test_weighted_f1": record["test_weighted_f1"],
        "test_accuracy": record["test_accuracy"],
        "val_loss": record["val_loss"], "val_weighted_f1": record["val_weighted_f1"],
        "best_epoch": record["epoch"], "epochs": epochs,
        "num_params": count_params(params), "num_trainable": trainable,
        "history": history,
        "test_predictions": predictions.tolist(),
        "indices": {k: v.tolist() for k, v in split.items()},
    }
    return result, steps


# --------------------------------------------------------------------------------- run


def _run_key(config: MUStARDConfig, method: str) -> dict[str, Any]:
    """The settings a finished run's result depends on."""
    skip = {"methods", "seeds", "folds", "workdir", "progress", "quick"}
    if method != "finetune":
        skip |= {f.name for f in dataclasses.fields(config)
                 if f.name.startswith(("finetune_", "text_", "freeze_", "warmup_"))
                 or f.name == "max_tokens"}
    if method != "context_fusion":
        skip.add("context_fusion")
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}


def finished_result(config: MUStARDConfig, method: str, path: Path) -> dict[str, Any] | None:
    """The stored result of a run finished with these settings, else None."""
    if not path.exists():
        return None
    done = json.loads(path.read_text())
    return done if done.get("run_key") == _run_key(config, method) else None


def _stats(per_fold_seed: dict[int, dict[int, float]]) -> dict[str, Any]:
    """Mean and sample std over folds of the seed-averaged fold scores (+ per seed)."""
    folds = sorted(per_fold_seed)
    per_fold = {f: float(np.mean(list(per_fold_seed[f].values()))) for f in folds}
    x = np.array(list(per_fold.values()))
    seeds = sorted({s for f in folds for s in per_fold_seed[f]})
    per_seed = {s: float(np.mean([per_fold_seed[f][s] for f in folds
                                  if s in per_fold_seed[f]])) for s in seeds}
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else None,
            "per_fold": {str(f): v for f, v in per_fold.items()},
            "per_seed": {str(s): v for s, v in per_seed.items()}}


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per method: weighted F1 and accuracy over folds (``_stats``), size and time.

    ``weighted_f1`` is that of the epoch chosen by the config's ``monitor``;
    ``weighted_f1_epoch_by_val_f1`` that of the epoch with the highest validation
    weighted F1 (a second validation-only rule, for comparison).
    """
    out = {}
    for method, runs in results.items():
        entry = {}
        for metric in ("weighted_f1", "accuracy"):
            table: dict[int, dict[int, float]] = {}
            for r in runs:
                table.setdefault(r["fold"], {})[r["seed"]] = r[f"test_{metric}"]
            entry[metric] = _stats(table)
        entry["runs"] = len(runs)
        if method != "majority":
            table = {}
            for r in runs:  # the other rule: the epoch with the best validation F1
                epoch = max(r["history"], key=lambda h: (h["val_weighted_f1"], -h["epoch"]))
                table.setdefault(r["fold"], {})[r["seed"]] = epoch["test_weighted_f1"]
            entry["weighted_f1_epoch_by_val_f1"] = _stats(table)
            entry["num_params"] = runs[0]["num_params"]
            entry["num_trainable"] = runs[0]["num_trainable"]
            times = [r["time_s"] for r in runs if r.get("time_s") is not None]
            entry["time_s"] = float(np.sum(times)) if times else None
            entry["best_epoch"] = [r["best_epoch"] for r in runs]
        out[method] = entry
    return out


_LABELS = {
    "majority": "majority class (train part)",
    "frozen_head": "(a) frozen MiniLM embedding + MLP head",
    "finetune": "(b) MiniLM fine-tuned (TextTransformer)",
    "context_fusion": "(c) utterance + context, {fusion} fusion (frozen MiniLM)",
}


def markdown_table(summary: dict[str, Any], config: MUStARDConfig) -> str:
    """The summary as a markdown table (%, mean ± std over folds), paper rows last."""

    def pct(s: dict[str, Any]) -> str:
        std = "" if s["std"] is None else f" ± {100 * s['std']:.1f}"
        return f"{100 * s['mean']:.1f}{std}"

    lines = ["| method | weighted F1 (%) | accuracy (%) | weighted F1, epoch by val F1 (%) "
             "| runs | trainable params | time (s) |", "|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        name = _LABELS.get(method, method).format(fusion=config.context_fusion)
        params = f"{s['num_trainable']:,}" if "num_trainable" in s else "—"
        t = f"{s['time_s']:.0f}" if s.get("time_s") is not None else "—"
        other = s.get("weighted_f1_epoch_by_val_f1")
        other = "—" if other is None else pct(other)
        lines.append(f"| {name} | {pct(s['weighted_f1'])} | {pct(s['accuracy'])} | "
                     f"{other} | {s['runs']} | {params} | {t} |")
    lines.append(f"| Castro et al. 2019, text only (BERT + SVM) | ≈{PAPER['text_only']:.0f}"
                 " | — | — | 5 folds | — | — |")
    lines.append(f"| Castro et al. 2019, text + audio + video | "
                 f"≈{PAPER['text_audio_video']:.0f} | — | — | 5 folds | — | — |")
    return "\n".join(lines) + "\n"


def run(config: MUStARDConfig) -> dict[str, Any]:
    """Runs every (method, fold, seed) not finished yet; writes and returns the summary.

    Returns:
      ``{"config", "paper", "metric", "methods": {method: summarize(...) entry}}``,
      also written to ``WORKDIR/results.json`` (and the table to ``results.md``).
    """
    methods = resolve_methods(config)
    root = Path(config.workdir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    runs = [(m, f, s) for m in methods for f in config.folds for s in config.seeds]
    path = lambda m, f, s: root / m / f"fold_{f}" / f"seed_{s}" / "result.json"
    todo = [r for r in runs if finished_result(config, r[0], path(*r)) is None]
    start = time.perf_counter()
    if todo:
        inputs = make_inputs(config, sorted({m for m, _, _ in todo}))
    else:
        from lepton_mm.data import load_mustard

        mustard = load_mustard()
        inputs = {"label": mustard.labels.astype(np.int32), "folds": mustard.folds}
    print(f"inputs ready ({time.perf_counter() - start:.0f} s)", flush=True)
    labels = inputs["label"]
    splits = {f: fold_split(labels, *inputs["folds"][f], f, config.val_fraction)
              for f in config.folds}
    results: dict[str, list[dict[str, Any]]] = {"majority": [
        {"fold": f, "seed": 0, **{f"test_{k}": v for k, v in majority_scores(
            labels, inputs["folds"][f][0], inputs["folds"][f][1]).items()}}
        for f in config.folds]}
    summary: dict[str, Any] = {}
    compiled: dict[str, _Steps] = {}  # per method, shared by its folds and seeds
    for i, (method, fold, seed) in enumerate(runs):
        result = finished_result(config, method, path(method, fold, seed))
        if result is None:
            split = dict(splits[fold])
            if method == "finetune" and config.finetune_max_train is not None:
                split["train"] = split["train"][:config.finetune_max_train]
            t0 = time.perf_counter()
            result, compiled[method] = train_and_test(
                config, method, seed, split, method_inputs(inputs, method), labels,
                compiled.get(method))
            result = {"method": method, "fold": fold, "seed": seed,
                      "run_key": _run_key(config, method),
                      "time_s": time.perf_counter() - t0, **result}
            path(method, fold, seed).parent.mkdir(parents=True, exist_ok=True)
            path(method, fold, seed).write_text(json.dumps(result, indent=2) + "\n")
        print(f"[{i + 1}/{len(runs)}] {method} fold {fold} seed {seed}: weighted F1 "
              f"{100 * result['test_weighted_f1']:.1f} %, accuracy "
              f"{100 * result['test_accuracy']:.1f} % (best epoch {result['best_epoch']}, "
              f"{result['time_s']:.0f} s)", flush=True)
        results.setdefault(method, []).append(result)
        summary = {
            "metric": "weighted F1 on each official test fold; mean and sample std "
                      "(ddof=1) over folds of the seed-averaged fold scores",
            "folds": list(config.folds), "seeds": list(config.seeds),
            "paper": {"weighted_f1_percent": PAPER, "source": "Castro et al., ACL 2019, "
                      "speaker-dependent setup"},
            "methods": summarize(results),
        }
        (root / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        (root / "results.md").write_text(markdown_table(summary["methods"], config))
    return summary


# -------------------------------------------------------------------------------- main


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(",") if s.strip())


def parse_args(argv: list[str] | None = None) -> MUStARDConfig:
    """Command line -> ``MUStARDConfig``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=None,
                        help=f"'all' or comma-separated: {', '.join(METHODS)}")
    parser.add_argument("--seeds", type=_ints, default=None, help="e.g. 0,1,2")
    parser.add_argument("--folds", type=_ints, default=None, help="e.g. 0,1 (default all)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--quick", action="store_true", help="2 folds, short training")
    parser.add_argument("--head-epochs", type=int, default=None)
    parser.add_argument("--finetune-epochs", type=int, default=None)
    parser.add_argument("--freeze-layers", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--context-fusion", default=None, help="a lepton_mm.fusion name")
    parser.add_argument("--monitor", choices=("loss", "weighted_f1"), default=None,
                        help="validation quantity that picks the epoch (default: loss)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"progress": args.progress}
    if args.methods is not None:
        overrides["methods"] = tuple(m for m in args.methods.split(",") if m)
    for name in ("seeds", "folds", "head_epochs", "finetune_epochs", "freeze_layers",
                 "max_tokens", "context_fusion", "monitor"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    overrides["workdir"] = args.workdir or ("runs/mustard_quick" if args.quick
                                            else "runs/mustard")
    return quick_config(**overrides) if args.quick else MUStARDConfig(**overrides)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    resolve_methods(config)
    start = time.perf_counter()
    summary = run(config)
    print()
    print(markdown_table(summary["methods"], config), end="")
    print(f"\n{Path(config.workdir) / 'results.json'}  ({time.perf_counter() - start:.0f} s)")
    return 0 if all(math.isfinite(s["weighted_f1"]["mean"])
                    for s in summary["methods"].values()) else 1


if __name__ == "__main__":
    from lepton_mm.training import tune_glibc_malloc

    tune_glibc_malloc()  # reuse freed step buffers (faster steps); docs/performance.md
    sys.exit(main())
