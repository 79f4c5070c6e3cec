"""Cross-modal alignment on AV-MNIST: image ↔ audio retrieval and audio → text zero-shot.

Two parts, both on ``lepton_mm.data.load_avmnist`` (PCA-degraded MNIST digits paired with
noisy spoken digits; ``docs/avmnist.md``):

* ``clip_loss`` / ``sigmoid_loss``: a ``TwoTower`` (MultiBench's image and audio LeNets,
  each followed by a linear ``ProjectionHead`` into a shared ``embed_dim`` space) trained
  on the training pairs with CLIP's softmax loss or SigLIP's sigmoid loss. No label is
  used in training. Reported: *class-level* recall@k on the test split in both
  directions — a query is a hit if one of its ``k`` nearest items in the other modality
  (all test items are the gallery) shows the same digit (``class_recall_at_k``).
* ``zero_shot``: the audio LeNet and a ``ProjectionHead`` into MiniLM's 384-d space,
  trained so that a clip's embedding is nearest (softmax over the ten digits, learned
  temperature) to the *frozen* all-MiniLM-L6-v2 embedding of a prompt naming its digit,
  the template drawn at random per example from ``TRAIN_TEMPLATES``. At test time the
  digit is read off the cosine with ten prompts alone (``zero_shot_classify``): the
  issue's "the spoken digit seven" (one of the training templates), two templates never
  seen in training, and the ensemble of the training templates.

Every part also reports its untrained baseline (the same model at initialisation,
evaluated the same way) and chance (``chance_class_recall_at_k``: a random ranking of
the gallery; 1/10 for zero-shot). Training uses ``lepton_mm.training.fit`` (Adam); the
epoch with the best validation loss (retrieval) or validation accuracy with the
"the spoken digit …" prompts (zero-shot) is kept. Per (part, seed) the run lives in
``WORKDIR/<part>/seed_<seed>/``; the summary goes to ``WORKDIR/results.json`` and
``WORKDIR/results.md``. Re-running a command skips finished runs and resumes
interrupted ones.

    python experiments/alignment.py --quick --workdir runs/alignment_quick   # ~3-5 min, CPU
    python experiments/alignment.py --workdir runs/alignment --seeds 0
    python experiments/alignment.py --parts zero_shot --epochs 1 --num-train 10000
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PARTS = ("clip_loss", "sigmoid_loss", "zero_shot")
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


@dataclasses.dataclass(frozen=True)
class AlignmentConfig:
    """Everything the experiment needs (``quick_config()`` for the fast variant).

    Attributes:
      parts: names in ``PARTS``; empty means all of them.
      seeds: training seeds (initialisation, shuffling, prompt templates).
      data_seed: the data set's seed (pairing and noise; ``load_avmnist``).
      snr_db: the audio noise level; the benchmark is -15 dB.
      workdir: root of the runs and the summary.
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
      train_templates: prompt templates for zero-shot training (``{}``: the digit word).
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
    """``--quick``: a subset, one seed, one epoch, all parts (~3-5 min on 2 CPU cores)."""
    base = dict(seeds=(0,), epochs=1, num_train=6000, num_val=1000, num_test=2000,
                checkpoint_every=None, quick=True)
    return AlignmentConfig(**{**base, **overrides})


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


def build_two_tower(config: AlignmentConfig, part: str, rngs: Any) -> Any:
    """Image LeNet and audio LeNet → linear ``ProjectionHead`` each → ``TwoTower``."""
    from lepton_mm.alignment import ProjectionHead
    from lepton_mm.data.avmnist import N_MELS
    from lepton_mm.encoders import AudioSpectrogramCNN, ImageCNN
    from lepton_mm.models import TwoTower

    _, init_scale, init_bias = LOSSES[part]
    image = ImageCNN.lenet(1, channels=config.image_channels, additional_layers=3,
                           rngs=rngs)
    audio = AudioSpectrogramCNN.lenet(N_MELS, channels=config.audio_channels,
                                      additional_layers=5, rngs=rngs)
    return TwoTower(image, audio,
                    ProjectionHead(image.dim, config.embed_dim, rngs=rngs),
                    ProjectionHead(audio.dim, config.embed_dim, rngs=rngs),
                    modalities=("image", "audio"), init_scale=init_scale,
                    init_bias=init_bias)


@functools.cache
def _prompt_matcher_class() -> type:
    """``PromptMatcher``, defined on first use so that importing this file stays light."""
    import jax.numpy as jnp
    from flax import nnx

    from lepton_mm.alignment import LogitScale, ProjectionHead
    from lepton_mm.data.avmnist import N_MELS
    from lepton_mm.encoders import AudioSpectrogramCNN

    class PromptTable(nnx.Variable):
        """Frozen text embeddings: not an ``nnx.Param``, so the optimiser leaves them."""

    class PromptMatcher(nnx.Module):
        """Audio LeNet → ``ProjectionHead`` into the text space, scored against prompts.

        ``model(batch)`` gives float32 logits ``[batch, 10]``: the learned scale times the
        cosine of each clip's embedding with the ten prompts of its template
        ``batch["template"]`` (int ``[batch]``, a row of the frozen table).
        """

        def __init__(self, config: AlignmentConfig, prompts: np.ndarray, *, rngs: Any):
            self.encoder = AudioSpectrogramCNN.lenet(
                N_MELS, channels=config.audio_channels, additional_layers=5, rngs=rngs)
            self.projection = ProjectionHead(self.encoder.dim, prompts.shape[-1],
                                             rngs=rngs)
            self.prompts = PromptTable(jnp.asarray(prompts, jnp.float32))
            self.scale = LogitScale()  # CLIP: 1/0.07, clamped to [1, 100]

        def embed(self, audio: tuple[Any, Any]) -> Any:
            """float32 ``[batch, 384]`` unit-norm embeddings of ``(log_mel, mask)``."""
            return self.projection(self.encoder(*audio).pooled)

        def __call__(self, batch: dict[str, Any]) -> Any:
            z = self.embed(batch["audio"])
            prompts = self.prompts[...][batch["template"]]  # [batch, 10, 384]
            scale, _ = self.scale()
            return scale * jnp.einsum("bd,bcd->bc", z, prompts)

    return PromptMatcher


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


def zero_shot_metrics(embeddings: np.ndarray, labels: np.ndarray, table: np.ndarray,
                      config: AlignmentConfig) -> dict[str, float]:
    """Zero-shot accuracy per template (by name) and for the training-template ensemble."""
    from lepton_mm.alignment import zero_shot_classify

    def accuracy(class_embeddings):
        return float(np.mean(np.asarray(zero_shot_classify(embeddings, class_embeddings))
                             == labels))

    templates = (*config.train_templates, *config.heldout_templates)
    out = {t: accuracy(table[i]) for i, t in enumerate(templates)}
    out["ensemble of training templates"] = accuracy(
        np.transpose(table[:len(config.train_templates)], (1, 0, 2)))
    return out


# -------------------------------------------------------------------------------- run


def _run_key(config: AlignmentConfig) -> dict[str, Any]:
    """The settings a finished run's result depends on (not parts/seeds/workdir)."""
    skip = {"parts", "seeds", "workdir", "progress", "checkpoint_every"}
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}


def finished_result(config: AlignmentConfig, workdir: Path) -> dict[str, Any] | None:
    """The stored result of a run finished with these settings, else None."""
    path = workdir / "result.json"
    if not path.exists():
        return None
    done = json.loads(path.read_text())
    return done if done.get("run_key") == _json(_run_key(config)) else None


def _json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def _claim_workdir(config: AlignmentConfig, workdir: Path) -> dict[str, Any]:
    """Refuses a workdir holding a run with other settings (more epochs are fine)."""
    key = _run_key(config)
    path = workdir / "run_key.json"
    if path.exists():
        old, new = json.loads(path.read_text()), _json(key)
        changed = sorted(k for k in {*old, *new} if k != "epochs" and old.get(k) != new.get(k))
        if changed:
            raise ValueError(f"{workdir}: holds a run with different {changed} "
                             f"({[old.get(k) for k in changed]} there, "
                             f"{[new.get(k) for k in changed]} now); use a fresh --workdir.")
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(key, indent=2) + "\n")
    return key


def _fit_summary(fitted: Any, seconds: float) -> dict[str, Any]:
    resumed = fitted.resumed_from or 0
    epochs_here = sum(1 for r in fitted.history if r["step"] > resumed)
    best_epoch = next(r["epoch"] for r in fitted.history if r["step"] == fitted.best_step)
    return {"epochs": len(fitted.history), "best_epoch": best_epoch,
            "num_params": fitted.num_params,
            # fit's wall time (training, validation, compilation) per epoch trained by
            # this call; None if it only restored a finished run.
            "epoch_time_s": seconds / epochs_here if epochs_here else None,
            "history": list(fitted.history), "resumed_from": fitted.resumed_from}


def run_retrieval(config: AlignmentConfig, part: str, seed: int, data: dict[str, Any],
                  workdir: Path) -> dict[str, Any]:
    """Trains (or resumes) the two-tower model of ``part``; returns and writes its result."""
    from lepton_mm.models import Contrastive
    from lepton_mm.training import OptimizerConfig, fit, seed_rngs

    key = _claim_workdir(config, workdir)
    test = data["test"]
    run_start = time.perf_counter()

    def evaluate(model):
        image = embed_all(model, "embed_a", test["image"], config.eval_batch_size)
        audio = embed_all(model, "embed_b", test["audio"], config.eval_batch_size)
        return retrieval_metrics(image, audio, test["label"], config.ks)

    model = build_two_tower(config, part, seed_rngs(seed))
    untrained = evaluate(model)
    start = time.perf_counter()
    fitted = fit(
        model, Contrastive(kind=LOSSES[part][0], ks=config.ks), data["train"],
        eval_data=data["val"], workdir=workdir,
        optimizer=OptimizerConfig(learning_rate=config.learning_rate),
        epochs=config.epochs, batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size, seed=seed, monitor="loss", mode="min",
        checkpoint_every=config.checkpoint_every, progress=config.progress,
        tensorboard=False, config={**key, "part": part})
    fit_time = time.perf_counter() - start
    result = {"part": part, "seed": seed, "run_key": key, "test_size": len(test["label"]),
              "trained": evaluate(model), "untrained": untrained,
              "chance": chance_metrics(test["label"], config.ks),
              "val_loss": fitted.best_metrics["loss"], **_fit_summary(fitted, fit_time),
              "run_time_s": time.perf_counter() - run_start}
    (workdir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_zero_shot(config: AlignmentConfig, seed: int, data: dict[str, Any],
                  table: np.ndarray, workdir: Path) -> dict[str, Any]:
    """Trains (or resumes) the audio → text model; returns and writes its result."""
    from lepton_mm.models import Classification
    from lepton_mm.training import OptimizerConfig, fit, seed_rngs

    key = _claim_workdir(config, workdir)
    run_start = time.perf_counter()
    # Template of each training example, drawn once per seed; validation uses the first
    # template (the prompt).
    train, val, test = data["train"], data["val"], data["test"]
    templates = np.random.default_rng(seed).integers(
        0, len(config.train_templates), len(train["label"])).astype(np.int32)
    train = {"audio": train["audio"], "label": train["label"], "template": templates}
    val = {"audio": val["audio"], "label": val["label"],
           "template": np.zeros(len(val["label"]), np.int32)}

    def evaluate(model):
        embeddings = embed_all(model, "embed", test["audio"], config.eval_batch_size)
        return zero_shot_metrics(embeddings, test["label"], table, config)

    model = _prompt_matcher_class()(config, table, rngs=seed_rngs(seed))
    untrained = evaluate(model)
    start = time.perf_counter()
    fitted = fit(
        model, Classification(NUM_CLASSES), train, eval_data=val, workdir=workdir,
        optimizer=OptimizerConfig(learning_rate=config.learning_rate),
        epochs=config.epochs, batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size, seed=seed, monitor="accuracy",
        mode="max", checkpoint_every=config.checkpoint_every, progress=config.progress,
        tensorboard=False, config={**key, "part": "zero_shot"})
    fit_time = time.perf_counter() - start
    labels = test["label"]
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    result = {"part": "zero_shot", "seed": seed, "run_key": key, "test_size": len(labels),
              "trained": evaluate(model), "untrained": untrained,
              "chance": {"uniform": 1 / NUM_CLASSES,
                         "majority class": float(counts.max() / counts.sum())},
              "val_accuracy": fitted.best_metrics["accuracy"],
              "learned_scale": float(model.scale()[0]),
              "heldout_templates": list(config.heldout_templates),
              **_fit_summary(fitted, fit_time), "run_time_s": time.perf_counter() - run_start}
    (workdir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _stats(values: dict[str, float]) -> dict[str, Any]:
    x = np.array(list(values.values()), float)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else None,
            "per_seed": values}


def _nested_stats(runs: list[dict[str, Any]], field: str) -> dict[str, Any]:
    """Mean/std/per-seed of every leaf of ``run[field]`` (nested dicts of floats)."""

    def walk(getter, template):
        if isinstance(template, dict):
            return {k: walk(lambda r, k=k: getter(r)[k], v) for k, v in template.items()}
        return _stats({str(r["seed"]): getter(r) for r in runs})

    return walk(lambda r: r[field], runs[0][field])


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per part: trained and untrained metrics (mean, std over seeds, per seed), chance,
    and the training record (epochs, best epoch, time per epoch, parameters)."""
    summary: dict[str, Any] = {}
    for part, runs in results.items():
        times = [r["epoch_time_s"] for r in runs if r["epoch_time_s"] is not None]
        summary[part] = {
            "trained": _nested_stats(runs, "trained"),
            "untrained": _nested_stats(runs, "untrained"),
            "chance": runs[0]["chance"],
            "test_size": runs[0]["test_size"],
            "epochs": runs[0]["epochs"],
            "best_epoch": {str(r["seed"]): r["best_epoch"] for r in runs},
            "epoch_time_s": float(np.mean(times)) if times else None,
            "num_params": runs[0]["num_params"],
            "run_time_s": {str(r["seed"]): r["run_time_s"] for r in runs},
        }
        if "heldout_templates" in runs[0]:
            summary[part]["heldout_templates"] = runs[0]["heldout_templates"]
    return summary


def _pct(s: dict[str, Any] | float) -> str:
    if not isinstance(s, dict):
        return f"{100 * s:.1f}"
    std = "" if s["std"] is None else f" ± {100 * s['std']:.1f}"
    return f"{100 * s['mean']:.1f}{std}"


def markdown_tables(summary: dict[str, Any]) -> str:
    """The summary as markdown tables (recall and accuracy in %)."""
    lines = []
    retrieval = [p for p in LOSSES if p in summary]
    if retrieval:
        ks = [m.split("@")[1] for m in summary[retrieval[0]]["chance"]["image_to_audio"]]
        n = summary[retrieval[0]]["test_size"]
        lines += [f"**Image ↔ audio, class-level recall@k (%)**, test split: {n:,} queries "
                  f"against a gallery of all {n:,} items of the other modality.", ""]
        header = " | ".join(f"{d} R@{k}" for d in ("image→audio", "audio→image") for k in ks)
        lines += [f"| model | {header} | epochs (best) | s / epoch | parameters |",
                  "|---|" + "---|" * (2 * len(ks) + 3)]

        def row(name, metrics, extra="— | — | —"):
            cells = " | ".join(_pct(metrics[d][f"recall@{k}"])
                               for d in ("image_to_audio", "audio_to_image") for k in ks)
            lines.append(f"| {name} | {cells} | {extra} |")

        row("chance (random ranking)", summary[retrieval[0]]["chance"])
        untrained = [summary[p]["untrained"] for p in retrieval]
        # The towers of both losses start from the same seed; only the scale/bias differ,
        # which do not enter the embeddings: one row then.
        shared = all(u == untrained[0] for u in untrained)
        if shared:
            row("untrained (same initial towers for every loss)", untrained[0])
        for part in retrieval:
            s = summary[part]
            if not shared:
                row(f"untrained ({part} init)", s["untrained"])
            best = ", ".join(str(b) for b in s["best_epoch"].values())
            epoch = "—" if s["epoch_time_s"] is None else f"{s['epoch_time_s']:.0f}"
            row(f"**{part}**", s["trained"],
                f"{s['epochs']} ({best}) | {epoch} | {s['num_params']:,}")
        lines.append("")
    if "zero_shot" in summary:
        s = summary["zero_shot"]
        prompts = list(s["trained"])
        lines += [f"**Audio → text zero-shot accuracy (%)**, test split ({s['test_size']:,} "
                  "clips), from the cosine with ten MiniLM prompt embeddings; column = the "
                  "prompt template (*held out*: never seen in training).", ""]
        heads = [f'"{p}"' if p.count("{}") else p for p in prompts]
        heads = [h + (" *(held out)*" if p in s.get("heldout_templates", ()) else "")
                 for h, p in zip(heads, prompts, strict=True)]
        lines += ["| model | " + " | ".join(heads) + " |", "|---|" + "---|" * len(prompts)]
        uniform, majority = s["chance"]["uniform"], s["chance"]["majority class"]
        lines.append(f"| chance (uniform; majority class {_pct(majority)}) | "
                     + " | ".join(_pct(uniform) for _ in prompts) + " |")
        for name in ("untrained", "trained"):
            lines.append(f"| {name} | " + " | ".join(_pct(s[name][p]) for p in prompts)
                         + " |")
        epoch = "—" if s["epoch_time_s"] is None else f"{s['epoch_time_s']:.0f}"
        best = ", ".join(str(b) for b in s["best_epoch"].values())
        lines += ["", f"Trained for {s['epochs']} epoch(s) (best by validation accuracy: "
                      f"{best}), {epoch} s / epoch, {s['num_params']:,} parameters."]
    return "\n".join(lines) + "\n"


def run(config: AlignmentConfig) -> dict[str, Any]:
    """Runs every (part, seed) not finished yet; writes and returns the summary."""
    parts = resolve_parts(config)
    # Absolute: Orbax refuses relative checkpoint paths (fit also resolves them since
    # 7e558e8; this run crashed on them before).
    root = Path(config.workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(
        json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    start = time.perf_counter()
    todo = [(p, s) for p in parts for s in config.seeds
            if finished_result(config, root / p / f"seed_{s}") is None]
    data = make_data(config) if todo else None  # a finished table needs no data
    table = prompt_table(config) if any(p == "zero_shot" for p, _ in todo) else None
    results: dict[str, list[dict[str, Any]]] = {}
    total, count = len(parts) * len(config.seeds), 0
    summary: dict[str, Any] = {}
    for part in parts:
        for seed in config.seeds:
            count += 1
            print(f"[{count}/{total}] {part} seed {seed}", flush=True)
            workdir = root / part / f"seed_{seed}"
            r = finished_result(config, workdir)
            if r is None and part == "zero_shot":
                r = run_zero_shot(config, seed, data, table, workdir)
            elif r is None:
                r = run_retrieval(config, part, seed, data, workdir)
            results.setdefault(part, []).append(r)
            print("        " + json.dumps(r["trained"]), flush=True)
            summary = summarize(results)
            run_time = sum(t for s in summary.values() for t in s["run_time_s"].values())
            (root / "results.json").write_text(json.dumps(
                {"results": summary, "config": dataclasses.asdict(config),
                 # every run's training and evaluation, whenever it was done
                 "total_run_time_s": run_time,
                 # this invocation only (data preparation included; a re-run that
                 # finds every run finished takes seconds)
                 "invocation_wall_time_s": time.perf_counter() - start}, indent=2) + "\n")
            (root / "results.md").write_text(markdown_tables(summary))
    return summary


# ------------------------------------------------------------------------------- main


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(",") if s.strip())


def parse_args(argv: list[str] | None = None) -> AlignmentConfig:
    """Command line → ``AlignmentConfig``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=None,
                        help=f"'all' or comma-separated: {', '.join(PARTS)} (default: all)")
    parser.add_argument("--seeds", type=_ints, default=None, help="e.g. 0,1,2")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--snr-db", type=float, default=-15.0,
                        help="audio noise level (the benchmark: -15)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--quick", action="store_true", help="subset, 1 seed, 1 epoch")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--num-train", type=int, default=None)
    parser.add_argument("--num-val", type=int, default=None)
    parser.add_argument("--num-test", type=int, default=None)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"data_seed": args.data_seed, "snr_db": args.snr_db,
                                 "progress": args.progress}
    if args.parts is not None:
        overrides["parts"] = tuple(p for p in args.parts.split(",") if p)
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    overrides["workdir"] = args.workdir or ("runs/alignment_quick" if args.quick
                                            else "runs/alignment")
    for name in ("epochs", "batch_size", "learning_rate", "num_train", "num_val",
                 "num_test"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return quick_config(**overrides) if args.quick else AlignmentConfig(**overrides)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    resolve_parts(config)
    start = time.perf_counter()
    summary = run(config)
    print()
    print(markdown_tables(summary), end="")
    print(f"\n{Path(config.workdir) / 'results.json'}  ({time.perf_counter() - start:.0f} s)")
    finite = all(math.isfinite(v["mean"]) for s in summary.values()
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
