"""MUStARD text: the config, inputs, models and per-fold training of sarcasm detection.

Three text-only methods on ``lepton_mm.data.load_mustard``'s official folds, all scored
by weighted F1 (Castro et al. 2019; ``experiments/mustard.py`` trains and reports them):

  frozen_head     the utterance's MiniLM sentence embedding (frozen) -> MLP head
  finetune        ``TextTransformer`` initialised from MiniLM and fine-tuned with the head
                  (``optimizer``: text tower at a ~30x lower learning rate, embedding
                  tables frozen), utterances batched by length bucket
  context_fusion  utterance and dialogue context as two modalities (frozen MiniLM
                  embeddings; the context's sentences are its tokens) -> fusion layer
                  -> the same head

``finetune+gru`` (``+lstm``, ``+bigru``, ``+bilstm``; ``MUStARDConfig.text_encoder``)
replaces ``finetune``'s pretrained Transformer by a recurrent encoder trained from
scratch on the same word-piece ids (``TEXT_ENCODERS``).

``make_inputs`` computes every method's inputs once; ``train_fold`` trains one method on
one fold (``fold_split``: a stratified validation slice of the fold's training part) and
scores its test part once, at the checkpoint of lowest validation loss;
``majority_fold`` is the majority-class baseline.

References:
  Castro et al., "Towards Multimodal Sarcasm Detection (An _Obviously_ Perfect Paper)",
  ACL 2019. https://arxiv.org/abs/1906.01815
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from lepton_mm import harness
from lepton_mm.types import EncoderOutput

__all__ = [
    "METHODS",
    "NUM_CLASSES",
    "TEXT_EMBED_DIM",
    "TEXT_ENCODERS",
    "VOCAB_SIZE",
    "Features",
    "MUStARDConfig",
    "build_model",
    "fold_scores",
    "fold_split",
    "majority_fold",
    "make_inputs",
    "method_inputs",
    "optimizer",
    "quick_config",
    "resolve_methods",
    "split_method",
    "train_fold",
]

#: The trained methods (``majority``, the baseline, trains nothing).
METHODS = ("frozen_head", "finetune", "context_fusion")
#: Sarcastic or not.
NUM_CLASSES = 2
_VAL_TAG = 7  # numpy seed tag of the validation slice
#: Recurrent text encoders (``lepton_mm.encoders.RecurrentTextEncoder``, one layer, no
#: dropout between layers) that ``MUStARDConfig.text_encoder`` puts in place of
#: ``finetune``'s Transformer: the run ``finetune+<name>`` (``finetune+gru``). Each
#: outputs 384 features (directions x ``hidden_size``), MiniLM's width, so the head is
#: ``finetune``'s exactly. Trained from scratch: its word-piece embeddings too
#: (``TEXT_EMBED_DIM``, over MiniLM's vocabulary), none of MiniLM's weights are loaded.
TEXT_ENCODERS = {"gru": {"cell": "gru", "bidirectional": False, "hidden_size": 384},
                 "lstm": {"cell": "lstm", "bidirectional": False, "hidden_size": 384},
                 "bigru": {"cell": "gru", "bidirectional": True, "hidden_size": 192},
                 "bilstm": {"cell": "lstm", "bidirectional": True, "hidden_size": 192}}
#: Size of a recurrent encoder's word-piece embeddings (trained, from a random init).
TEXT_EMBED_DIM = 128
#: all-MiniLM-L6-v2's WordPiece vocabulary: the ids both text towers read.
VOCAB_SIZE = 30522


@dataclasses.dataclass(frozen=True)
class MUStARDConfig:
    """Everything the experiment needs (``quick_config()`` for the fast variant).

    Attributes:
      methods, seeds, folds: what to run (empty methods: all; folds of 0..4).
      workdir: root of the runs' checkpoints; results: root of the run ledger.
      val_fraction: share of each fold's training part held out (stratified).
      head_hidden, head_dropout: the head's hidden width (the fusion output for
        ``context_fusion``) and the dropout on its input features.
      weight_decay: AdamW decoupled weight decay (not on biases and norm scales).
      head_epochs, head_batch_size, head_learning_rate: the frozen-feature methods.
      finetune_epochs, finetune_batch_size: fine-tuning.
      text_learning_rate, finetune_head_learning_rate: peak rates of the text tower and
        of the head while fine-tuning (cosine decay after a linear warmup over
        ``warmup_fraction`` of the steps; gradients clipped to global norm 1).
      warmup_fraction: the share of the fine-tuning steps the rates warm up over.
      freeze_embeddings: keep the word/position/segment tables fixed.
      freeze_layers: also freeze the lowest this many transformer blocks.
      max_tokens: utterances are truncated to this many word pieces and bucketed by
        length (16, 32, ... up to ``max_tokens``).
      eval_batch_size: batch size of validation and test passes.
      context_fusion: a name in ``lepton_mm.fusion.FUSIONS``.
      finetune_max_train: fine-tune on only this many training examples (quick).
      text_encoder: recurrent text encoders (keys of ``TEXT_ENCODERS``: ``gru``,
        ``lstm``, ``bigru``, ``bilstm``; ``transformer``, ``finetune``'s own, may be
        named and adds nothing): ``finetune`` is also trained with its text tower
        replaced by each, as ``finetune+<encoder>``. Same word-piece ids (MiniLM's
        tokenizer, ``max_tokens``), length buckets, epochs, batch size, warmup and
        cosine schedule, clipping, head and validation rule as ``finetune``, but
        trained from scratch (no pretrained weights exist for it): every parameter,
        embeddings included, at ``finetune_head_learning_rate`` (the ~30x lower tower
        rate and the frozen tables protect pretrained weights, which it lacks).
        Trainable parameters: 3.9M of embeddings (30522 x 128; only the rows of
        word pieces MUStARD uses get gradients) plus 0.59M (GRU) / 0.79M (LSTM) /
        0.37M (BiGRU) / 0.49M (BiLSTM) recurrent, against ~10.7M unfrozen in
        ``finetune``'s pretrained blocks.
      progress: tqdm bars (None: when stdout is a terminal); quick: set by
        ``quick_config``.
    """

    methods: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    workdir: str = "runs/mustard"
    results: str = "results"
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
    finetune_max_train: int | None = None
    text_encoder: tuple[str, ...] = ()
    progress: bool | None = None
    quick: bool = False

    def __post_init__(self):
        for name in ("methods", "seeds", "folds"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct seeds, got {list(self.seeds)}.")
        if not self.folds or len(set(self.folds)) != len(self.folds) or \
                not all(0 <= f < 5 for f in self.folds):
            raise ValueError(f"folds: expected distinct folds in 0..4, got "
                             f"{list(self.folds)}.")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction: expected a number in (0, 0.5), got "
                             f"{self.val_fraction!r}.")
        if not 16 <= self.max_tokens <= 512:
            raise ValueError(f"max_tokens: expected 16..512, got {self.max_tokens!r}.")
        encoders = tuple(e for e in dict.fromkeys(self.text_encoder) if e != "transformer")
        unknown = [e for e in encoders if e not in TEXT_ENCODERS]
        if unknown:
            raise ValueError(f"text_encoder: unknown encoders {unknown}; known: "
                             f"{['transformer', *TEXT_ENCODERS]}.")
        object.__setattr__(self, "text_encoder", encoders)


def quick_config(**overrides: Any) -> MUStARDConfig:
    """``--quick``: 2 folds, one seed, short training, a small fine-tuning subset; records
    under ``WORKDIR/results``, never in the committed ledger.

    Args:
      **overrides: config fields that replace the quick settings.

    Returns:
      The config, ``quick=True``.
    """
    base = dict(folds=(0, 1), seeds=(0,), head_epochs=15, finetune_epochs=1,
                finetune_max_train=48, max_tokens=16, quick=True,
                workdir="runs/mustard_quick")
    merged = {**base, **overrides}
    merged.setdefault("results", str(Path(merged["workdir"]) / "results"))
    return MUStARDConfig(**merged)


def split_method(method: str) -> tuple[str, str | None]:
    """A method key -> its method and recurrent text encoder.

    Args:
      method: e.g. ``"finetune+gru"`` or ``"finetune"``.

    Returns:
      ``("finetune", "gru")``, ``("finetune", None)``.
    """
    base, plus, encoder = method.partition("+")
    return (base, encoder) if plus else (method, None)


def resolve_methods(config: MUStARDConfig) -> list[str]:
    """The methods to run, validated (before any computation).

    Args:
      config: its ``methods`` (empty or ``("all",)``: ``METHODS``; ``majority``, the
        baseline every config also runs, may be named to select it alone),
        ``context_fusion`` and ``text_encoder``.

    Returns:
      Method keys, each once, in the config's order; ``finetune`` followed by
      ``finetune+<encoder>`` for each of ``text_encoder``.

    Raises:
      ValueError: an unknown method or fusion, or text encoders without ``finetune``.
    """
    from lepton_mm.fusion import FUSIONS

    if config.context_fusion not in FUSIONS:
        raise ValueError(f"Unrecognized fusion: {config.context_fusion!r}. Known: "
                         f"{sorted(FUSIONS)}.")
    if not config.methods or config.methods == ("all",):
        methods = list(METHODS)
    else:
        for m in config.methods:
            if m not in ("majority", *METHODS):
                raise ValueError(f"Unrecognized method: {m!r}. Known: {list(METHODS)} "
                                 "(or 'all', or 'majority'); recurrent text encoders via "
                                 "--text-encoder.")
        methods = list(dict.fromkeys(config.methods))
    if config.text_encoder and "finetune" not in methods:
        raise ValueError(f"text_encoder: {list(config.text_encoder)} replace finetune's "
                         "Transformer, but finetune is not among the methods "
                         f"{methods}.")
    out = []
    for m in methods:
        out += [m, *(f"{m}+{e}" for e in config.text_encoder if m == "finetune")]
    return out


# ------------------------------------------------------------------------------- data


def fold_split(labels: np.ndarray, train: np.ndarray, test: np.ndarray, fold: int,
               val_fraction: float) -> dict[str, np.ndarray]:
    """An official fold's training part split into train and a stratified validation
    slice (drawn from the fold number only).

    Args:
      labels: int ``[690]``: every utterance's label.
      train: int ``[n_train]``: the fold's training indices.
      test: int ``[n_test]``: its test indices.
      fold: the fold number (seeds the validation draw).
      val_fraction: the share of each class held out.

    Returns:
      ``{"train", "val", "test"}``: sorted int64 index arrays, pairwise disjoint;
      ``"test"`` is the fold's test part.
    """
    rng = np.random.default_rng([fold, _VAL_TAG])
    val = []
    for c in np.unique(labels[train]):
        members = train[labels[train] == c]
        val.append(rng.choice(members, round(val_fraction * len(members)), replace=False))
    val = np.sort(np.concatenate(val))
    return {"train": np.setdiff1d(train, val), "val": val, "test": np.asarray(test)}


def fold_scores(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Weighted F1 (the benchmark's score) and accuracy.

    Args:
      predictions: int ``[n]``: predicted classes.
      labels: int ``[n]``: true classes.

    Returns:
      ``{"weighted_f1", "accuracy"}``.
    """
    import jax.numpy as jnp

    from lepton_mm.metrics import precision_recall_f1

    _, _, f1 = precision_recall_f1(jnp.asarray(predictions), jnp.asarray(labels),
                                   num_classes=NUM_CLASSES, average="weighted")
    return {"weighted_f1": float(f1), "accuracy": float(np.mean(predictions == labels))}


def make_inputs(config: MUStARDConfig, methods: list[str]) -> dict[str, Any]:
    """Every method's model inputs for all 690 utterances, computed once.

    Args:
      config: ``max_tokens`` and ``progress``.
      methods: the method keys whose inputs to compute (empty: labels and folds only).

    Returns:
      ``"label"``, ``"folds"`` and, as needed, ``"tokens"`` (int32 word-piece ids
      ``[690, max_tokens]`` and bool mask), ``"utterance_embedding"`` (float32 unit-norm
      MiniLM embeddings ``[690, 1, 384]`` and mask) and ``"context_embedding"`` (float32
      ``[690, 11, 384]``, a row per context sentence, and mask).
    """
    from lepton_mm.data import load_mustard
    from lepton_mm.pretrained import SentenceEncoder

    mustard = load_mustard()
    out: dict[str, Any] = {"label": mustard.labels.astype(np.int32), "folds": mustard.folds}
    methods = [split_method(m)[0] for m in methods]  # finetune+gru: finetune's tokens
    if not methods:
        return out
    encoder = SentenceEncoder.from_pretrained()
    progress = sys.stdout.isatty() if config.progress is None else config.progress
    if "finetune" in methods:
        ids = SentenceEncoder(encoder.model, encoder.tokenizer,
                              max_seq_length=config.max_tokens).tokenize(mustard.utterances)
        mask = np.arange(config.max_tokens)[None] < np.array([len(r) for r in ids])[:, None]
        tokens = np.zeros(mask.shape, np.int32)
        tokens[mask] = np.concatenate(ids)
        out["tokens"] = (tokens, mask)
    if {"frozen_head", "context_fusion"} & set(methods):
        emb = encoder.encode(mustard.utterances, progress=progress)
        out["utterance_embedding"] = (emb[:, None], np.ones((len(emb), 1), bool))
    if "context_fusion" in methods:
        emb = encoder.encode([s for c in mustard.contexts for s in c], progress=progress)
        sizes = np.array([len(c) for c in mustard.contexts])
        mask = np.arange(sizes.max())[None] < sizes[:, None]
        context = np.zeros((*mask.shape, emb.shape[1]), np.float32)
        context[mask] = emb  # row-major: each utterance's sentences in order
        out["context_embedding"] = (context, mask)
    return out


def method_inputs(inputs: dict[str, Any], method: str) -> dict[str, tuple[Any, Any]]:
    """What ``method``'s model encodes.

    Args:
      inputs: ``make_inputs``'s.
      method: a method key (``finetune+gru``: ``finetune``'s token ids).

    Returns:
      ``{modality: (features or token ids, mask)}``.
    """
    if split_method(method)[0] == "finetune":
        return {"utterance": inputs["tokens"]}
    out = {"utterance": inputs["utterance_embedding"]}
    if method == "context_fusion":
        out["context"] = inputs["context_embedding"]
    return out


def _source(config: MUStARDConfig, modalities: dict[str, Any], labels: np.ndarray,
            idx: np.ndarray) -> Any:
    """Examples ``idx`` as a batch source: token ids by length bucket, features as is."""
    from lepton_mm.data import ArrayDataset, BucketedDataset

    arrays = {m: (x[idx], mask[idx]) for m, (x, mask) in modalities.items()}
    arrays["label"] = labels[idx]
    if not np.issubdtype(arrays["utterance"][0].dtype, np.integer):
        return ArrayDataset(arrays)
    bounds = (*(b for b in (16, 32, 64, 128, 256) if b < config.max_tokens),
              config.max_tokens)
    return BucketedDataset(arrays, {"utterance": arrays["utterance"][1].sum(1)},
                           bucket_bounds=bounds)


# ------------------------------------------------------------------------------ model


class Features(nnx.Module):
    """A parameter-free encoder of precomputed features: their ``EncoderOutput``.

    Args:
      dim: the features' size (the encoder's ``dim``).
    """

    def __init__(self, dim: int):
        self.dim = dim

    def __call__(self, features: Any, mask: Any) -> EncoderOutput:
        """Wraps the features.

        Args:
          features: float ``[batch, time, dim]``.
          mask: bool ``[batch, time]``.

        Returns:
          ``EncoderOutput.from_tokens``: ``pooled`` is the masked mean over time.
        """
        return EncoderOutput.from_tokens(features, mask)


def build_model(config: MUStARDConfig, method: str, rngs: Any) -> Any:
    """The ``MultimodalClassifier`` of ``method``.

    The pooled 384-d utterance through Dropout -> Linear(384, head_hidden) -> ReLU ->
    Linear(head_hidden, 2); for ``context_fusion`` the fusion layer replaces the first
    linear layer (``concat``: exactly that layer on ``[utterance; mean context]``).
    ``finetune+<encoder>``: ``finetune``'s model with a ``RecurrentTextEncoder`` of
    ``TEXT_ENCODERS`` (random initialisation) as its text tower; its pooled output is
    the masked mean of its states, 384-d.

    Args:
      config: the head's and the fusion's settings.
      method: a method key (a name in ``METHODS``, or ``finetune+<encoder>``).
      rngs: ``nnx.Rngs`` for the initialisation (and the dropout).

    Returns:
      The model (``finetune``: with MiniLM's weights in its text tower).
    """
    import jax

    from lepton_mm.fusion import FUSIONS, build
    from lepton_mm.models import MultimodalClassifier
    from lepton_mm.pretrained import load_text_transformer
    from lepton_mm.pretrained.sentence_encoder import default_model_path

    dim = 384  # all-MiniLM-L6-v2
    if method == "context_fusion":
        encoders = {"utterance": Features(dim), "context": Features(dim)}
        kwargs = ({"dropout": config.head_dropout} if "dropout" in inspect.signature(
            FUSIONS[config.context_fusion]).parameters else {})
        fusion = build(config.context_fusion, {m: dim for m in encoders},
                       config.head_hidden, rngs=rngs, **kwargs)
        head = nnx.Sequential(jax.nn.relu,
                              nnx.Linear(config.head_hidden, NUM_CLASSES, rngs=rngs))
        return MultimodalClassifier(encoders, fusion, head)
    base, encoder = split_method(method)
    if encoder is not None:
        from lepton_mm.encoders import RecurrentTextEncoder

        if base != "finetune" or encoder not in TEXT_ENCODERS:
            raise ValueError(f"Unrecognized method: {method!r}; recurrent text encoders "
                             f"replace finetune's: finetune+{{{','.join(TEXT_ENCODERS)}}}.")
        text = RecurrentTextEncoder(VOCAB_SIZE, embed_dim=TEXT_EMBED_DIM, dim=dim,
                                    rngs=rngs, num_layers=1, **TEXT_ENCODERS[encoder])
    else:
        text = (load_text_transformer(default_model_path(), rngs=rngs)[0]
                if method == "finetune" else Features(dim))
    head = nnx.Sequential(nnx.Dropout(config.head_dropout, rngs=rngs),
                          nnx.Linear(dim, config.head_hidden, rngs=rngs), jax.nn.relu,
                          nnx.Linear(config.head_hidden, NUM_CLASSES, rngs=rngs))
    return MultimodalClassifier({"utterance": text}, None, head)


def optimizer(config: MUStARDConfig, method: str, steps: int) -> Any:
    """AdamW; fine-tuning: the head's rate, the text tower at ``text_learning_rate``
    (``lr_multipliers``), frozen tables (``freeze``), cosine decay over ``steps``.
    ``finetune+<encoder>`` (trained from scratch): the same schedule and clipping, every
    parameter at the head's rate, nothing frozen.

    Args:
      config: the rates, decay, warmup and freezing settings.
      method: a method key.
      steps: the training steps (the schedule's length).

    Returns:
      The ``OptimizerConfig``.
    """
    from lepton_mm.training import OptimizerConfig

    base, encoder = split_method(method)
    if base != "finetune":
        return OptimizerConfig(name="adamw", learning_rate=config.head_learning_rate,
                               weight_decay=config.weight_decay)
    warmup = max(1, round(config.warmup_fraction * steps))
    if encoder is not None:
        return OptimizerConfig(
            name="adamw", learning_rate=config.finetune_head_learning_rate,
            weight_decay=config.weight_decay, schedule="cosine", warmup_steps=warmup,
            total_steps=max(steps, warmup + 1), clip_norm=1.0)
    freeze = []
    if config.freeze_embeddings:
        freeze.append(r"^encoders/utterance/(word|position|segment)_embeddings/")
    if config.freeze_layers:
        layers = "|".join(str(i) for i in range(config.freeze_layers))
        freeze.append(rf"^encoders/utterance/layers/({layers})/")
    return OptimizerConfig(
        name="adamw", learning_rate=config.finetune_head_learning_rate,
        weight_decay=config.weight_decay, schedule="cosine", warmup_steps=warmup,
        total_steps=max(steps, warmup + 1), clip_norm=1.0, freeze=tuple(freeze),
        lr_multipliers={"^encoders/": config.text_learning_rate
                        / config.finetune_head_learning_rate})


# -------------------------------------------------------------------------------- runs


def train_fold(config: MUStARDConfig, method: str, seed: int, split: dict[str, Any],
               modalities: dict[str, Any], labels: np.ndarray,
               workdir: Path) -> tuple[dict[str, Any], float | None, int]:
    """Trains (or resumes) one fold with ``fit`` and scores its test part once, at the
    checkpoint of lowest validation loss.

    Args:
      config: the method's settings.
      method: a method key (``finetune+<encoder>``: ``finetune``'s epochs and batches).
      seed: initialisation, dropout and shuffling.
      split: ``fold_split``'s indices.
      modalities: ``method_inputs``'s arrays (all 690 utterances).
      labels: int ``[690]``.
      workdir: the fold's checkpoints.

    Returns:
      ``(the fold's metrics, its seconds per epoch trained here or None, the number of
      trained parameters)``; the metrics: test weighted F1, accuracy and predictions,
      validation loss and accuracy, best epoch, training size and history.
    """
    import jax

    from lepton_mm.models import Classification
    from lepton_mm.training import fit, predict, seed_rngs, trainable_mask

    start, finetune = time.perf_counter(), split_method(method)[0] == "finetune"
    epochs = config.finetune_epochs if finetune else config.head_epochs
    batch_size = config.finetune_batch_size if finetune else config.head_batch_size
    train = _source(config, modalities, labels, split["train"])
    model = build_model(config, method, seed_rngs(seed))
    opt = optimizer(config, method, epochs * train.num_batches(batch_size))
    fitted = fit(model, Classification(NUM_CLASSES), train,
                 eval_data=_source(config, modalities, labels, split["val"]),
                 workdir=workdir, optimizer=opt, epochs=epochs, batch_size=batch_size,
                 eval_batch_size=config.eval_batch_size, seed=seed, monitor="loss",
                 mode="min", keep_checkpoints=1, progress=config.progress, tensorboard=False)
    test = split["test"]
    predictions = np.asarray(predict(
        model, {m: (x[test], mask[test]) for m, (x, mask) in modalities.items()},
        batch_size=config.eval_batch_size)).argmax(1)
    scores = fold_scores(predictions, labels[test])
    facts = harness.fit_facts(fitted, time.perf_counter() - start,
                              eval_metrics=("loss", "accuracy"))
    params = nnx.state(model, nnx.Param)
    trained = zip(jax.tree.leaves(params), jax.tree.leaves(trainable_mask(params, opt)),
                  strict=True)
    fold = {"test_weighted_f1": scores["weighted_f1"], "test_accuracy": scores["accuracy"],
            "test_predictions": predictions.tolist(), "val_loss": fitted.best_metrics["loss"],
            "val_accuracy": fitted.best_metrics["accuracy"], "best_epoch": facts["best_epoch"],
            "train_size": len(split["train"]), "history": facts["history"]}
    return fold, facts["seconds_per_epoch"], sum(p.size for p, t in trained if t)


def majority_fold(labels: np.ndarray, split: dict[str, Any]) -> dict[str, Any]:
    """The majority-class baseline on one fold (trains nothing).

    Args:
      labels: int ``[690]``.
      split: ``fold_split``'s indices.

    Returns:
      ``{"test_weighted_f1", "test_accuracy", "val_accuracy"}`` of predicting the
      training part's majority class.
    """
    majority = np.bincount(labels[split["train"]], minlength=NUM_CLASSES).argmax()
    scores = fold_scores(np.full(len(split["test"]), majority), labels[split["test"]])
    return {"test_weighted_f1": scores["weighted_f1"], "test_accuracy": scores["accuracy"],
            "val_accuracy": float(np.mean(labels[split["val"]] == majority))}
