"""Cross-modal alignment on AV-MNIST: image ↔ audio retrieval and an audio classifier
over text-prompt embeddings.

Two questions on ``lepton_mm.data.load_avmnist`` (PCA-degraded MNIST digits paired with
noisy spoken digits; ``docs/avmnist.md``), three parts:

* ``clip_loss`` / ``sigmoid_loss``: a ``TwoTower`` (MultiBench's image and audio LeNets,
  each followed by a linear ``ProjectionHead`` into a shared ``embed_dim`` space) trained
  on the training pairs with CLIP's softmax loss or SigLIP's sigmoid loss. No label is
  used in training. Reported: *class-level* recall@k on the test split in both
  directions — a query is a hit if one of its ``k`` nearest items in the other modality
  (all test items are the gallery) shows the same digit (``class_recall_at_k``).
* ``prompt_classifier``: a ``lepton_mm.models.PromptMatcher`` — the audio LeNet and a
  ``ProjectionHead`` into MiniLM's 384-d space, trained *with the training split's
  labels* (softmax cross-entropy) so that a clip's embedding is nearest (learned
  temperature) to the *frozen* all-MiniLM-L6-v2 embedding of a prompt naming its digit,
  the template drawn at random per example from ``TRAIN_TEMPLATES``. At test time the
  digit is read off the cosine with ten prompts alone (``zero_shot_classify``): "the
  spoken digit seven" (one of the training templates), two templates never seen in
  training, and the ensemble of the training templates. It is a classifier whose
  weights are text embeddings: zero-shot with respect to the prompt wording, not to the
  classes (every digit is trained on).

Every part also reports its untrained baseline (the same model at initialisation,
evaluated the same way) and chance (``chance_class_recall_at_k``: a random ranking of
the gallery; 1/10 for the prompt classifier). Training uses ``lepton_mm.training.fit``
(Adam); the epoch with the best validation loss (retrieval) or validation accuracy with
the "the spoken digit …" prompts (prompt classifier) is kept, and the test split is
scored once, there.

Each (part, seed) run writes a record to the ledger (``lepton_mm.experiment``) at
``results/alignment/<part>/seed<k>.json``; its checkpoints live in
``WORKDIR/<part>/seed<k>-<hash>/`` (the hash of its settings: a changed run never
resumes an old one). ``metrics["test_accuracy"]`` is the class-level R@1 averaged over
both directions for the retrieval parts (the accuracy of labelling a query by its
nearest item of the other modality) and the accuracy with "the spoken digit {}" for the
prompt classifier; ``val_accuracy`` the same on the validation split. Re-running a
command trains only runs whose record is missing or stale; ``--report --out DIR`` trains
nothing and writes ``results.json`` and ``results.md`` from the ledger (the same records
give the same bytes).

    python experiments/alignment.py --quick --workdir runs/alignment_quick   # ~3-5 min, CPU
    python experiments/alignment.py --workdir runs/alignment --seeds 0
    python experiments/alignment.py --report --out runs/alignment_report
    python experiments/alignment.py --parts prompt_classifier --epochs 1 --num-train 10000
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lepton_mm.experiment import NUMERICS

#: Experiment name in the ledger: records at ``results/alignment/<part>/seed<k>.json``.
EXPERIMENT = "alignment"
PARTS = ("clip_loss", "sigmoid_loss", "prompt_classifier")
#: the ``Contrastive`` task's ``kind`` and ``TwoTower``'s initial scale and bias per loss
#: (CLIP: 1/0.07 and no bias; SigLIP: 10 and -10, as in each paper).
LOSSES = {"clip_loss": ("softmax", 1 / 0.07, 0.0), "sigmoid_loss": ("sigmoid", 10.0, -10.0)}
NUM_CLASSES = 10
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Prompt templates seen in training; the first is the issue's and drives validation.
TRAIN_TEMPLATES = (
    "the spoken digit {}",
    "a recording of someone saying {}",
    "the number {}",
    "a voice saying the word {}",
    "{}",
    "the digit {} said out loud",
)
#: Never seen in training: does the audio embedding follow MiniLM to new wordings?
HELDOUT_TEMPLATES = ("an audio clip of the number {}", "someone says {}")
#: The prompt classifier's column over its training-template ensemble.
ENSEMBLE = "ensemble of training templates"


@dataclasses.dataclass(frozen=True)
class AlignmentConfig:
    """Everything the experiment needs (``quick_config()`` for the fast variant).

    Attributes:
      parts: names in ``PARTS``; empty means all of them.
      seeds: training seeds (initialisation, shuffling, prompt templates).
      data_seed: the data set's seed (pairing and noise; ``load_avmnist``).
      snr_db: the audio noise level; the benchmark is -15 dB.
      workdir: root of the runs' checkpoints and logs (local, not committed).
      results: root of the run ledger (``<results>/alignment/<part>/seed<k>.json``,
        committed); ``--quick`` keeps its records under the workdir instead.
      epochs: passes over the training split; the best validation epoch is kept.
      batch_size: training batch size (also the contrastive losses' negatives + 1).
      eval_batch_size: batch size of validation and of the test embeddings.
      learning_rate: Adam's learning rate.
      embed_dim: size of the image–audio shared space.
      image_channels: first width of the image LeNet (4 blocks: 6 -> 48 features).
      audio_channels: first width of the audio LeNet (6 blocks: 6 -> 192 features).
      num_train, num_val, num_test: use the first examples of each split (None: all).
      normalize_audio: standardise the log-mels with training-split statistics.
      ks: the k of recall@k.
      train_templates: prompt templates of the prompt classifier's training (``{}``:
        the digit word).
      heldout_templates: templates only used at test time.
      checkpoint_every: also checkpoint every this many steps (resume granularity).
      progress: tqdm bars (None: when stdout is a terminal).
      quick: set by ``quick_config``.
    """

    parts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    data_seed: int = 0
    snr_db: float = -15.0
    workdir: str = "runs/alignment"
    results: str = "results"
    epochs: int = 1
    batch_size: int = 64
    eval_batch_size: int = 64
    learning_rate: float = 3e-3
    embed_dim: int = 64
    image_channels: int = 6
    audio_channels: int = 6
    num_train: int | None = None
    num_val: int | None = None
    num_test: int | None = None
    normalize_audio: bool = True
    ks: tuple[int, ...] = (1, 5)
    train_templates: tuple[str, ...] = TRAIN_TEMPLATES
    heldout_templates: tuple[str, ...] = HELDOUT_TEMPLATES
    checkpoint_every: int | None = 500
    progress: bool | None = None
    quick: bool = False

    def __post_init__(self):
        for name in ("parts", "ks", "train_templates", "heldout_templates"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct seeds, got {list(self.seeds)}.")
        if not self.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1
                              for k in self.ks):
            raise ValueError(f"ks: expected positive ints, got {list(self.ks)}.")
        if not self.train_templates:
            raise ValueError("train_templates: expected at least one template.")
        for t in (*self.train_templates, *self.heldout_templates):
            if t.count("{}") != 1:
                raise ValueError(f"templates: each needs exactly one '{{}}', got {t!r}.")


def quick_config(**overrides: Any) -> AlignmentConfig:
    """``--quick``: a subset, one seed, one epoch, all parts (~3-5 min on 2 CPU cores);
    records under ``WORKDIR/results``, never in the committed ledger."""
    base = dict(seeds=(0,), epochs=1, num_train=6000, num_val=1000, num_test=2000,
                checkpoint_every=None, quick=True)
    merged = {**base, **overrides}
    merged.setdefault("workdir", "runs/alignment_quick")
    merged.setdefault("results", str(Path(merged["workdir"]) / "results"))
    return AlignmentConfig(**merged)


def resolve_parts(config: AlignmentConfig) -> list[str]:
    """The parts to run, validated (before any computation)."""
    if not config.parts or config.parts == ("all",):
        return list(PARTS)
    for p in config.parts:
        if p not in PARTS:
            raise ValueError(f"Unrecognized part: {p!r}. Known: {list(PARTS)} (or 'all').")
    return list(dict.fromkeys(config.parts))


# ------------------------------------------------------------------------------- data


def make_data(config: AlignmentConfig) -> dict[str, Any]:
    """``{"train", "val", "test"}`` → batch-format dicts of numpy arrays for ``fit``.

    The first ``num_*`` examples of each split, materialised once (~0.4 ms and 32 KiB
    per example); log-mels standardised with the training split's valid frames. The
    same recipe as ``experiments/avmnist.py`` (forked, not imported: experiments stay
    self-contained).
    """
    from lepton_mm.data import load_avmnist

    avmnist = load_avmnist(data_seed=config.data_seed, snr_db=config.snr_db)
    out = {}
    for name, n in (("train", config.num_train), ("val", config.num_val),
                    ("test", config.num_test)):
        split = getattr(avmnist, name)
        if n is not None:
            if not 0 < n <= len(split):
                raise ValueError(f"num_{name}: expected 1..{len(split)}, got {n}.")
            split = split.subset(np.arange(n))
        out[name] = split.materialize()
    if config.normalize_audio:
        log_mel, mask = out["train"]["audio"]
        total = square = count = 0.0
        for i in range(0, len(mask), 1024):  # float64 sums, chunk by chunk
            valid = log_mel[i:i + 1024][mask[i:i + 1024]].astype(np.float64)
            total, square, count = (total + valid.sum(), square + (valid ** 2).sum(),
                                    count + valid.size)
        mean = total / count
        std = np.float32(np.sqrt(square / count - mean ** 2))
        for data in out.values():
            data["audio"][0][...] -= np.float32(mean)  # in place: no 2 GB temporaries
            data["audio"][0][...] /= std
    return out


def prompt_table(config: AlignmentConfig, encoder: Any = None) -> np.ndarray:
    """float32 ``[templates, 10, 384]``: MiniLM embeddings (unit norm) of every template
    (training ones first, then held-out) filled with each digit word."""
    if encoder is None:
        from lepton_mm.pretrained import SentenceEncoder

        encoder = SentenceEncoder.from_pretrained()
    templates = (*config.train_templates, *config.heldout_templates)
    texts = [t.format(word) for t in templates for word in DIGITS]
    table = np.asarray(encoder.encode(texts), np.float32)
    return table.reshape(len(templates), NUM_CLASSES, -1)


# ----------------------------------------------------------------------------- models


def build_two_tower(config: AlignmentConfig, part: str, n_mels: int, rngs: Any) -> Any:
    """Image LeNet and audio LeNet → linear ``ProjectionHead`` each → ``TwoTower``."""
    from lepton_mm.alignment import ProjectionHead
    from lepton_mm.encoders import AudioSpectrogramCNN, ImageCNN
    from lepton_mm.models import TwoTower

    _, init_scale, init_bias = LOSSES[part]
    image = ImageCNN.lenet(1, channels=config.image_channels, additional_layers=3,
                           rngs=rngs)
    audio = AudioSpectrogramCNN.lenet(n_mels, channels=config.audio_channels,
                                      additional_layers=5, rngs=rngs)
    return TwoTower(image, audio,
                    ProjectionHead(image.dim, config.embed_dim, rngs=rngs),
                    ProjectionHead(audio.dim, config.embed_dim, rngs=rngs),
                    modalities=("image", "audio"), init_scale=init_scale,
                    init_bias=init_bias)


def build_prompt_classifier(config: AlignmentConfig, table: np.ndarray, n_mels: int,
                            rngs: Any) -> Any:
    """The audio LeNet scored against the prompt table (``PromptMatcher``)."""
    from lepton_mm.encoders import AudioSpectrogramCNN
    from lepton_mm.models import PromptMatcher

    audio = AudioSpectrogramCNN.lenet(n_mels, channels=config.audio_channels,
                                      additional_layers=5, rngs=rngs)
    return PromptMatcher(audio, table, modality="audio", rngs=rngs)


@functools.cache
def _embed_fn() -> Any:
    """jit of ``getattr(nnx.merge(graphdef, state), method)(inputs)``."""
    import jax
    from flax import nnx

    def embed(graphdef, state, inputs, method):
        return getattr(nnx.merge(graphdef, state), method)(inputs)

    return jax.jit(embed, static_argnames=("graphdef", "method"))


def embed_all(model: Any, method: str, inputs: Any, batch_size: int) -> np.ndarray:
    """``model.<method>`` over every example of ``inputs`` in eval mode, fixed-size
    batches (the last one padded with copies of the first example)."""
    import jax
    from flax import nnx

    model = nnx.clone(model)
    model.eval()
    graphdef, state = nnx.split(model)
    n = len(jax.tree.leaves(inputs)[0])
    out = []
    for i in range(0, n, batch_size):
        rows = np.arange(i, i + batch_size)
        rows[rows >= n] = 0
        batch = jax.tree.map(lambda a, r=rows: a[r], inputs)
        out.append(np.asarray(_embed_fn()(graphdef, state, batch, method)))
    return np.concatenate(out)[:n]


# ------------------------------------------------------------------------ evaluation


def retrieval_metrics(image: np.ndarray, audio: np.ndarray, labels: np.ndarray,
                      ks: tuple[int, ...], chunk: int = 1000) -> dict[str, dict[str, float]]:
    """``{direction: {"recall@k": value}}`` for image→audio and audio→image (class level,
    the whole split as the gallery); queries in chunks to bound memory."""
    from lepton_mm.alignment import first_match_rank

    out = {}
    for direction, (query, gallery) in (("image_to_audio", (image, audio)),
                                        ("audio_to_image", (audio, image))):
        ranks = np.concatenate([
            np.asarray(first_match_rank(query[i:i + chunk], gallery, labels[i:i + chunk],
                                        labels))
            for i in range(0, len(query), chunk)])
        out[direction] = {f"recall@{k}": float(np.mean(ranks < k)) for k in ks}
    return out


def chance_metrics(labels: np.ndarray, ks: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Chance class-level recall@k (random ranking), the same in both directions."""
    from lepton_mm.alignment import chance_class_recall_at_k

    row = {f"recall@{k}": float(chance_class_recall_at_k(labels, labels, k=k)) for k in ks}
    return {"image_to_audio": dict(row), "audio_to_image": dict(row)}


def prompt_metrics(embeddings: np.ndarray, labels: np.ndarray, table: np.ndarray,
                   config: AlignmentConfig) -> dict[str, float]:
    """Accuracy from the prompts of each template (by name) and of the training-template
    ensemble (mean of the normalised prompt embeddings per digit, as CLIP)."""
    from lepton_mm.alignment import zero_shot_classify

    def accuracy(class_embeddings):
        return float(np.mean(np.asarray(zero_shot_classify(embeddings, class_embeddings))
                             == labels))

    templates = (*config.train_templates, *config.heldout_templates)
    out = {t: accuracy(table[i]) for i, t in enumerate(templates)}
    out[ENSEMBLE] = accuracy(np.transpose(table[:len(config.train_templates)], (1, 0, 2)))
    return out


def _mean_r1(metrics: dict[str, dict[str, float]]) -> float:
    return (metrics["image_to_audio"]["recall@1"] + metrics["audio_to_image"]["recall@1"]) / 2


# -------------------------------------------------------------------------------- run

# Settings no part's result depends on; and per part, those of the other parts.
_NOT_RESULT = ("parts", "seeds", "workdir", "results", "progress", "checkpoint_every",
               "quick")
_PART_ONLY = {"prompt_classifier": ("train_templates", "heldout_templates"),
              "retrieval": ("embed_dim", "image_channels")}


def run_config(config: AlignmentConfig, part: str) -> dict[str, Any]:
    """Everything one run's record depends on (its ``config``; hashed into the key)."""
    other = _PART_ONLY["retrieval" if part == "prompt_classifier" else "prompt_classifier"]
    out = {k: v for k, v in dataclasses.asdict(config).items()
           if k not in _NOT_RESULT and k not in other}
    return {**out, "part": part}


def run_workdir(config: AlignmentConfig, key: Any) -> Path:
    """``WORKDIR/<part>/seed<k>[-data<d>]-<hash>``: the run's checkpoints and log."""
    from lepton_mm.experiment import config_hash

    tag = config_hash({"config": config_hash(run_config(config, key.method)),
                       "numerics": NUMERICS})[:8]
    # Absolute: Orbax refuses relative checkpoint paths.
    return Path(config.workdir).resolve() / key.method / f"{key.file_name()[:-5]}-{tag}"


def expected_keys(config: AlignmentConfig) -> list[Any]:
    """The ``RunKey`` of every (part, seed) the config asks for."""
    from lepton_mm.experiment import RunKey

    return [RunKey(EXPERIMENT, p, s, config.data_seed)
            for p in resolve_parts(config) for s in config.seeds]


def run_command(config: AlignmentConfig, part: str, seed: int) -> str:
    """The command line (from the repository root) that trains just this run again."""
    defaults = quick_config() if config.quick else AlignmentConfig()
    words = ["python experiments/alignment.py", *(["--quick"] if config.quick else []),
             f"--parts {part}", f"--seeds {seed}"]
    for field in ("data_seed", "snr_db", "epochs", "batch_size", "learning_rate",
                  "num_train", "num_val", "num_test"):
        value = getattr(config, field)
        if value != getattr(defaults, field):
            words.append(f"--{field.replace('_', '-')} {value:g}" if isinstance(value, float)
                         else f"--{field.replace('_', '-')} {value}")
    return " ".join([*words, "--force"])


def _record(config: AlignmentConfig, part: str, seed: int, fitted: Any, fit_time: float,
            metrics: dict[str, Any]) -> dict[str, Any]:
    """The ledger record of a finished run."""
    import jax

    from lepton_mm import experiment as ledger

    resumed = fitted.resumed_from or 0
    epochs_here = sum(1 for r in fitted.history if r["step"] > resumed)
    metrics = {**metrics, "epochs": len(fitted.history),
               "best_epoch": next(r["epoch"] for r in fitted.history
                                  if r["step"] == fitted.best_step)}
    return ledger.make_record(
        ledger.RunKey(EXPERIMENT, part, seed, config.data_seed),
        command=run_command(config, part, seed), config=run_config(config, part),
        numerics=NUMERICS, metrics=metrics, robustness=None, params=fitted.num_params,
        # fit's wall time (training, validation, compilation) per epoch trained by this
        # call; None when the call only restored a finished run.
        seconds_per_epoch=round(fit_time / epochs_here, 2) if epochs_here else None,
        peak_rss_mb=round(ledger.peak_rss_mb(), 1),
        machine=ledger.machine_info(device_kind=jax.devices()[0].device_kind),
        extra={"resumed_from": fitted.resumed_from})


def run_retrieval(config: AlignmentConfig, part: str, seed: int, data: dict[str, Any],
                  workdir: Path) -> dict[str, Any]:
    """Trains (or resumes) the two-tower model of ``part``; returns its record."""
    from lepton_mm import experiment as ledger
    from lepton_mm.models import Contrastive
    from lepton_mm.training import OptimizerConfig, fit, seed_rngs

    def evaluate(model, split):
        image = embed_all(model, "embed_a", split["image"], config.eval_batch_size)
        audio = embed_all(model, "embed_b", split["audio"], config.eval_batch_size)
        return retrieval_metrics(image, audio, split["label"], config.ks)

    test = data["test"]
    model = build_two_tower(config, part, test["audio"][0].shape[-1], seed_rngs(seed))
    untrained = evaluate(model, test)
    start = time.perf_counter()
    fitted = fit(
        model, Contrastive(kind=LOSSES[part][0], ks=config.ks), data["train"],
        eval_data=data["val"], workdir=workdir,
        optimizer=OptimizerConfig(learning_rate=config.learning_rate),
        epochs=config.epochs, batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size, seed=seed, monitor="loss", mode="min",
        checkpoint_every=config.checkpoint_every, progress=config.progress,
        tensorboard=False, config={"hash": ledger.config_hash(run_config(config, part))})
    fit_time = time.perf_counter() - start
    trained = evaluate(model, test)
    return _record(config, part, seed, fitted, fit_time, {
        "test_accuracy": _mean_r1(trained), "val_accuracy": _mean_r1(evaluate(model,
                                                                              data["val"])),
        "val_loss": fitted.best_metrics["loss"], "test_size": len(test["label"]),
        "trained": trained, "untrained": untrained,
        "chance": chance_metrics(test["label"], config.ks),
        "history": [{"epoch": r["epoch"], "train_loss": round(r["train_loss"], 6),
                     "val_loss": r["eval"]["loss"]} for r in fitted.history]})


def run_prompt_classifier(config: AlignmentConfig, seed: int, data: dict[str, Any],
                          table: np.ndarray, workdir: Path) -> dict[str, Any]:
    """Trains (or resumes) the audio classifier over prompt embeddings; returns its record.

    Each training clip is scored against a template drawn once per seed; validation
    uses the first template (the issue's prompt).
    """
    from lepton_mm import experiment as ledger
    from lepton_mm.models import Classification
    from lepton_mm.training import OptimizerConfig, fit, seed_rngs

    train, val, test = data["train"], data["val"], data["test"]
    templates = np.random.default_rng(seed).integers(
        0, len(config.train_templates), len(train["label"])).astype(np.int32)
    train = {"audio": train["audio"], "label": train["label"], "template": templates}
    val = {"audio": val["audio"], "label": val["label"],
           "template": np.zeros(len(val["label"]), np.int32)}

    def evaluate(model):
        embeddings = embed_all(model, "embed", test["audio"], config.eval_batch_size)
        return prompt_metrics(embeddings, test["label"], table, config)

    model = build_prompt_classifier(config, table, test["audio"][0].shape[-1],
                                    seed_rngs(seed))
    untrained = evaluate(model)
    start = time.perf_counter()
    fitted = fit(
        model, Classification(NUM_CLASSES), train, eval_data=val, workdir=workdir,
        optimizer=OptimizerConfig(learning_rate=config.learning_rate),
        epochs=config.epochs, batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size, seed=seed, monitor="accuracy",
        mode="max", checkpoint_every=config.checkpoint_every, progress=config.progress,
        tensorboard=False, config={"hash": ledger.config_hash(
            run_config(config, "prompt_classifier"))})
    fit_time = time.perf_counter() - start
    trained = evaluate(model)
    counts = np.bincount(test["label"], minlength=NUM_CLASSES)
    return _record(config, "prompt_classifier", seed, fitted, fit_time, {
        "test_accuracy": trained[config.train_templates[0]],
        "val_accuracy": fitted.best_metrics["accuracy"],
        "test_size": len(test["label"]), "trained": trained, "untrained": untrained,
        "chance": {"uniform": 1 / NUM_CLASSES,
                   "majority class": float(counts.max() / counts.sum())},
        "learned_scale": float(model.scale()[0]),
        "heldout_templates": list(config.heldout_templates),
        "history": [{"epoch": r["epoch"], "train_loss": round(r["train_loss"], 6),
                     "val_accuracy": r["eval"]["accuracy"]} for r in fitted.history]})


# ---------------------------------------------------------------------------- report


def _nested_stats(runs: list[dict[str, Any]], field: str) -> Any:
    """``seed_stats`` of every leaf of ``record["metrics"][field]`` (nested dicts)."""
    from lepton_mm.experiment import seed_stats

    def walk(getter, template):
        if isinstance(template, dict):
            return {k: walk(lambda r, k=k: getter(r)[k], v) for k, v in template.items()}
        return seed_stats({str(r["seed"]): getter(r) for r in runs})

    return walk(lambda r: r["metrics"][field], runs[0]["metrics"][field])


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per part, from its records: trained and untrained metrics (mean, std over seeds,
    per seed), chance, the validation accuracy and the training record (epochs, best
    epoch, seconds per epoch, parameters)."""
    from lepton_mm.experiment import seed_stats

    summary: dict[str, Any] = {}
    for part, runs in results.items():
        metrics = runs[0]["metrics"]
        times = [r["seconds_per_epoch"] for r in runs if r["seconds_per_epoch"] is not None]
        summary[part] = {
            "trained": _nested_stats(runs, "trained"),
            "untrained": _nested_stats(runs, "untrained"),
            "val_accuracy": seed_stats({str(r["seed"]): r["metrics"]["val_accuracy"]
                                        for r in runs}),
            "chance": metrics["chance"], "test_size": metrics["test_size"],
            "epochs": metrics["epochs"],
            "best_epoch": {str(r["seed"]): r["metrics"]["best_epoch"] for r in runs},
            "epoch_time_s": float(np.mean(times)) if times else None,
            "num_params": runs[0]["params"],
        }
        if part == "prompt_classifier":  # records store keys sorted: restore the columns
            config = runs[0]["config"]
            order = [*config["train_templates"], *config["heldout_templates"], ENSEMBLE]
            for name in ("trained", "untrained"):
                summary[part][name] = {t: summary[part][name][t] for t in order}
            summary[part]["heldout_templates"] = metrics["heldout_templates"]
    return summary


def _pct(s: dict[str, Any] | float) -> str:
    from lepton_mm.experiment import format_mean_std

    return format_mean_std(s) if isinstance(s, dict) else f"{100 * s:.1f}"


def _retrieval_table(summary: dict[str, Any], parts: list[str]) -> list[str]:
    ks = sorted((m.split("@")[1] for m in summary[parts[0]]["chance"]["image_to_audio"]),
                key=int)
    n = summary[parts[0]]["test_size"]
    directions = ("image_to_audio", "audio_to_image")
    header = " | ".join(f"{d} R@{k}" for d in ("image→audio", "audio→image") for k in ks)
    lines = [f"**Image ↔ audio, class-level recall@k (%)**, test split: {n:,} queries "
             f"against a gallery of all {n:,} items of the other modality.", "",
             f"| model | {header} | epochs (best) | s / epoch | parameters |",
             "|---|" + "---|" * (2 * len(ks) + 3)]

    def row(name, metrics, extra="— | — | —"):
        cells = " | ".join(_pct(metrics[d][f"recall@{k}"]) for d in directions for k in ks)
        lines.append(f"| {name} | {cells} | {extra} |")

    row("chance (random ranking)", summary[parts[0]]["chance"])
    untrained = [summary[p]["untrained"] for p in parts]
    # The towers of both losses start from the same seed; only the scale/bias differ,
    # which do not enter the embeddings: one row then.
    shared = all(u == untrained[0] for u in untrained)
    if shared:
        row("untrained (same initial towers for every loss)", untrained[0])
    for part in parts:
        s = summary[part]
        if not shared:
            row(f"untrained ({part} init)", s["untrained"])
        best = ", ".join(str(b) for b in s["best_epoch"].values())
        epoch = "—" if s["epoch_time_s"] is None else f"{s['epoch_time_s']:.0f}"
        row(f"**{part}**", s["trained"], f"{s['epochs']} ({best}) | {epoch} | "
                                         f"{s['num_params']:,}")
    return [*lines, ""]


def _prompt_table(s: dict[str, Any]) -> list[str]:
    prompts = list(s["trained"])
    heads = [f'"{p}"' if p.count("{}") else p for p in prompts]
    heads = [h + (" *(held out)*" if p in s.get("heldout_templates", ()) else "")
             for h, p in zip(heads, prompts, strict=True)]
    lines = [f"**Audio → digit through text-prompt embeddings (prompt classifier), "
             f"accuracy (%)**, test split ({s['test_size']:,} clips): the digit whose "
             "MiniLM prompt embedding is nearest; the audio tower was trained with the "
             "training split's labels against the training templates; column = the prompt "
             "template (*held out*: never seen in training).", "",
             "| model | " + " | ".join(heads) + " |", "|---|" + "---|" * len(prompts)]
    uniform, majority = s["chance"]["uniform"], s["chance"]["majority class"]
    lines.append(f"| chance (uniform; majority class {_pct(majority)}) | "
                 + " | ".join(_pct(uniform) for _ in prompts) + " |")
    for name in ("untrained", "trained"):
        lines.append(f"| {name} | " + " | ".join(_pct(s[name][p]) for p in prompts) + " |")
    epoch = "—" if s["epoch_time_s"] is None else f"{s['epoch_time_s']:.0f}"
    best = ", ".join(str(b) for b in s["best_epoch"].values())
    return [*lines, "", f"Trained for {s['epochs']} epoch(s) (best by validation accuracy: "
                        f"{best}), {epoch} s / epoch, {s['num_params']:,} parameters."]


def markdown_tables(summary: dict[str, Any]) -> str:
    """The summary as markdown tables (recall and accuracy in %)."""
    lines: list[str] = []
    retrieval = [p for p in LOSSES if p in summary]
    if retrieval:
        lines += _retrieval_table(summary, retrieval)
    if "prompt_classifier" in summary:
        lines += _prompt_table(summary["prompt_classifier"])
    return "\n".join(lines) + "\n"


def report(config: AlignmentConfig, out: str | Path) -> dict[str, Any]:
    """Reads the ledger (trains nothing); writes ``results.json`` and ``results.md`` to
    ``out`` and returns the ``results.json`` content: per part the ``summarize`` entry
    of its current records, ``complete``, ``missing`` and ``stale`` (run labels; stale
    records, made with other settings or numerics, are never tabled). The same records
    give byte-identical files."""
    from lepton_mm import experiment as ledger

    keys = expected_keys(config)
    found = ledger.collect(
        ledger.Ledger(config.results, EXPERIMENT), keys, numerics=NUMERICS,
        config_hashes=lambda k: ledger.config_hash(run_config(config, k.method)))
    summary = summarize({p: runs for p, runs in found.current.items() if runs})
    result = {"parts": summary, "complete": found.complete, "expected_runs": len(keys),
              "current_runs": sum(len(r) for r in found.current.values()),
              "missing": found.missing, "stale": found.stale, "numerics": NUMERICS}
    ledger.write_json(result, Path(out) / "results.json")
    status = (f"{result['current_runs']} of {len(keys)} runs have a current record"
              + ("" if found.complete else f"; missing: {', '.join(found.missing)}")
              + (f"; stale (not tabled): {', '.join(found.stale)}" if found.stale else ""))
    ledger.write_text(f"{status}.\n\n" + (markdown_tables(summary) if summary else ""),
                      Path(out) / "results.md")
    return result


def run(config: AlignmentConfig, *, shard: str | None = None,
        force: bool = False) -> dict[str, Any]:
    """Trains every (part, seed) whose record is missing or stale (all with ``force``;
    ``shard`` ``"i/n"``: every n-th of them), writing each record as it finishes; then
    ``report(config, config.workdir)``."""
    from lepton_mm import experiment as ledger

    book = ledger.Ledger(config.results, EXPERIMENT)
    keys = expected_keys(config)
    todo = keys if force else book.todo(
        keys, numerics=NUMERICS,
        config_hashes=lambda k: ledger.config_hash(run_config(config, k.method)))
    todo = ledger.shard(todo, shard)
    print(f"alignment: {len(todo)} of {len(keys)} runs to train", flush=True)
    data = make_data(config) if todo else None  # a finished table needs no data
    table = (prompt_table(config) if any(k.method == "prompt_classifier" for k in todo)
             else None)
    for i, key in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {key.label()}", flush=True)
        workdir = run_workdir(config, key)
        if key.method == "prompt_classifier":
            record = run_prompt_classifier(config, key.seed, data, table, workdir)
        else:
            record = run_retrieval(config, key.method, key.seed, data, workdir)
        path = book.write(record)
        print(f"        test accuracy {100 * record['metrics']['test_accuracy']:.1f} % "
              f"-> {path}", flush=True)
    return report(config, config.workdir)


# ------------------------------------------------------------------------------- main


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(",") if s.strip())


def parse_args(argv: list[str] | None = None) -> tuple[AlignmentConfig, argparse.Namespace]:
    """Command line → ``(AlignmentConfig, the parsed arguments)``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=None,
                        help=f"'all' or comma-separated: {', '.join(PARTS)} (default: all)")
    parser.add_argument("--seeds", type=_ints, default=None, help="e.g. 0,1,2")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--snr-db", type=float, default=-15.0,
                        help="audio noise level (the benchmark: -15)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--results", default=None,
                        help="ledger root (default: results; --quick: WORKDIR/results)")
    parser.add_argument("--quick", action="store_true", help="subset, 1 seed, 1 epoch")
    for name, kind in (("epochs", int), ("batch-size", int), ("learning-rate", float),
                       ("num-train", int), ("num-val", int), ("num-test", int)):
        parser.add_argument(f"--{name}", type=kind, default=None)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    for flag, text in (("--force", "train even the runs with a current record"),
                       ("--report", "only read the ledger; write results.json/.md to --out")):
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="of the runs to train, take those at I, I+N, I+2N, ...")
    parser.add_argument("--out", default=None, help="report directory (default: workdir)")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"data_seed": args.data_seed, "snr_db": args.snr_db,
                                 "progress": args.progress}
    if args.parts is not None:
        overrides["parts"] = tuple(p for p in args.parts.split(",") if p)
    for name in ("seeds", "workdir", "results", "epochs", "batch_size", "learning_rate",
                 "num_train", "num_val", "num_test"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.quick:
        return quick_config(**overrides), args
    return AlignmentConfig(**overrides), args


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    resolve_parts(config)
    out = Path(args.out or config.workdir)
    start = time.perf_counter()
    result = (report(config, out) if args.report
              else run(config, shard=args.shard, force=args.force))
    if not args.report and args.out:
        result = report(config, out)
    print()
    print((out / "results.md").read_text(), end="")
    print(f"\n{out / 'results.json'}  complete: {str(result['complete']).lower()}  "
          f"({time.perf_counter() - start:.0f} s)")
    finite = all(math.isfinite(v["mean"]) for s in result["parts"].values()
                 for v in _leaves(s["trained"]))
    return 0 if finite else 1


def _leaves(tree: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``{"mean", "std", "per_seed"}`` dicts of a nested stats tree."""
    if "mean" in tree:
        return [tree]
    return [leaf for v in tree.values() for leaf in _leaves(v)]


if __name__ == "__main__":
    from lepton_mm.training import tune_glibc_malloc

    tune_glibc_malloc()  # reuse freed step buffers (faster steps); docs/performance.md
    sys.exit(main())
