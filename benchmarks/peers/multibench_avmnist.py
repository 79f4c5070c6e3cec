"""MultiBench's AV-MNIST recipe in PyTorch: the peer rows of the AV-MNIST table.

Reimplements ``pliang279/MultiBench``'s late-fusion AV-MNIST example
(``examples/multimedia/avmnist_simple_late_fusion.py``: ``LeNet`` encoders from
``unimodals/common_models.py``, ``Concat``, ``MLP(240, 100, 10)``, trained by
``training_structures/Supervised_Learning.train``) and trains it on exactly the arrays
``experiments/avmnist.py``'s ``make_data`` builds for the same data seed. Records go
to the same ledger as the experiment (``results/avmnist/<method>/seed<k>.json``) under
the methods ``peer_multibench_image``, ``peer_multibench_audio`` and
``peer_multibench_concat``. PyTorch comes from the ``bench`` extra; the library never
imports this file, and the training itself uses no JAX (only ``make_data`` does).

    python benchmarks/peers/multibench_avmnist.py                       # 3 methods x 3 seeds
    python benchmarks/peers/multibench_avmnist.py --methods concat --seeds 0 --epochs 1 \\
        --num-train 2000 --num-val 500 --num-test 500 --results /tmp/peer_results

The recipe, as MultiBench runs it: image ``LeNet(1, 6, 3)`` (48 features), audio
``LeNet(1, 6, 5)`` (192 features), each conv bias-free with ``kaiming_uniform_``
weights, ``BatchNorm2d``, ReLU and 2x2 max pooling; concat ``[image; audio]`` ->
Linear(240, 100) -> ReLU -> Linear(100, 10) (unimodal: Linear(d, 100) -> ReLU ->
Linear(100, 10)), PyTorch's default initialisation outside the convolutions. Plain SGD
(lr 0.1, no momentum, weight decay 1e-4 on every parameter), cross-entropy, gradient
norm clipped at 8 (``train``'s ``clip_val`` default), batch 40 (validation and test
too), the epoch with the best validation accuracy kept (strictly better only, so ties
keep the earlier epoch) and scored once on the test split. 5 epochs, like our
experiment (MultiBench's example runs 30).

Where this differs from MultiBench, and why:
  * Input: our log-mel ``[126, 64]`` (MultiBench: a 112x112 spectrogram). Six 2x2
    pools bring 64 mel bins to 1 either way; along time MultiBench's floor pooling
    (126 -> 63 -> 31 -> 15 -> 7 -> 3 -> 1) would drop trailing rows at five of the six
    pools, so the audio LeNet pools with ``ceil_mode=True`` (126 -> ... -> 2), as
    ``lepton_mm.encoders.AudioSpectrogramCNN.lenet`` does, and averages the remaining
    2x1 map (MultiBench squeezes a 1x1 map; for the image's 1x1 map the two are the
    same). Both give 192 features; ``audio_pool="floor"`` builds MultiBench's literal
    pooling.
  * Padding: frames outside the clip's mask are set to zero (the training-mean level
    after standardisation) before the first convolution and are then ordinary input.
    Our masked encoder instead re-zeros them before every convolution, leaves them out
    of the batch-norm statistics and of max pooling, and averages only valid tokens;
    here batch norm, pooling and the final mean see them (about half of all frames).
  * Unimodal rows use MultiBench's late-fusion trainer (eval-mode validation, best
    validation *accuracy*, clipping) with the same encoders and lr. MultiBench's own
    unimodal scripts differ (``training_structures/unimodal.py``: no clipping,
    validation in training mode, best validation *loss*; its image example uses
    ``LeNet(1, 3, 3)`` and lr 0.01), so one protocol covers the three rows here.
  * A trailing training batch of one example is skipped (batch norm cannot normalise
    one value per channel; MultiBench would raise). 55 000 / 40 leaves none.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
#: Ledger experiment the records join (``experiments/avmnist.py``'s).
EXPERIMENT = "avmnist"
#: CLI method -> ledger method name.
METHODS = {"image": "peer_multibench_image", "audio": "peer_multibench_audio",
           "concat": "peer_multibench_concat"}
IMAGE_FEATURES = 48  # LeNet(1, 6, 3): 6 * 2**3
AUDIO_FEATURES = 192  # LeNet(1, 6, 5): 6 * 2**5
HIDDEN = 100
NUM_CLASSES = 10
#: ``Supervised_Learning.train``'s default ``clip_val``.
CLIP_NORM = 8.0
#: Bumped when a change here can change trained numbers (part of each record's config).
RECIPE_VERSION = 1
_AUDIO_POOLS = ("ceil", "floor")
_EXPERIMENT_MODULE = "_peer_multibench_avmnist_experiment"


# ------------------------------------------------------------------------------ model


class LeNet(nn.Module):
    """MultiBench's ``LeNet(in_channels, channels, additional_layers)``.

    A 5x5 conv to ``channels``, then ``additional_layers`` 3x3 convs doubling the width;
    each "same"-padded and bias-free, followed by ``BatchNorm2d``, ReLU and 2x2 max
    pooling. Conv weights are ``kaiming_uniform_`` (a=0), as MultiBench initialises
    them; batch norm keeps PyTorch's defaults (momentum 0.1, eps 1e-5).

    Args:
      in_channels: input channels (1).
      channels: width of the first block.
      additional_layers: number of 3x3 blocks after the first.
      ceil_mode: keep partial pooling windows (our audio encoder's choice); False is
        MultiBench's ``F.max_pool2d(out, 2)``.
    """

    def __init__(self, in_channels: int, channels: int, additional_layers: int, *,
                 ceil_mode: bool = False):
        super().__init__()
        widths = [channels * 2**i for i in range(additional_layers + 1)]
        kernels = [5] + [3] * additional_layers
        self.out_features = widths[-1]
        self.ceil_mode = ceil_mode
        self.convs = nn.ModuleList([
            nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False)
            for c_in, c_out, k in zip([in_channels, *widths[:-1]], widths, kernels,
                                      strict=True)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(c) for c in widths])
        for conv in self.convs:
            nn.init.kaiming_uniform_(conv.weight)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """``x [b, in_channels, h, w]`` -> the last block's map ``[b, widths[-1], h', w']``."""
        for conv, bn in zip(self.convs, self.bns, strict=True):
            x = F.max_pool2d(F.relu(bn(conv(x))), 2, ceil_mode=self.ceil_mode)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [b, in_channels, h, w]`` -> features ``[b, widths[-1]]`` (map averaged)."""
        return self.feature_map(x).mean(dim=(2, 3))


class LateFusionClassifier(nn.Module):
    """MultiBench's ``MMDL([image LeNet, audio LeNet], Concat(), MLP(d, 100, 10))``.

    Args:
      method: ``"image"``, ``"audio"`` or ``"concat"`` (which encoders feed the head).
      audio_pool: ``"ceil"`` (default, as our audio encoder) or ``"floor"``
        (MultiBench's literal pooling) along the audio LeNet's axes.
    """

    def __init__(self, method: str, *, audio_pool: str = "ceil"):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"Unrecognized method: {method!r}. Known: {list(METHODS)}.")
        if audio_pool not in _AUDIO_POOLS:
            raise ValueError(f"audio_pool: expected one of {_AUDIO_POOLS}, got "
                             f"{audio_pool!r}.")
        self.method = method
        self.image = LeNet(1, 6, 3) if method != "audio" else None
        self.audio = (LeNet(1, 6, 5, ceil_mode=audio_pool == "ceil")
                      if method != "image" else None)
        dim = sum(e.out_features for e in (self.image, self.audio) if e is not None)
        self.head = nn.Sequential(nn.Linear(dim, HIDDEN), nn.ReLU(),
                                  nn.Linear(HIDDEN, NUM_CLASSES))

    def forward(self, image: torch.Tensor | None, audio: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[b, 10]`` from image ``[b, 1, 28, 28]`` and/or log-mel ``[b, 1, 126, 64]``."""
        features = []
        if self.image is not None:
            features.append(self.image(image))
        if self.audio is not None:
            features.append(self.audio(audio))
        return self.head(torch.cat(features, dim=1))


def param_count(model: nn.Module) -> int:
    """Trainable parameters (batch-norm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------- data


def _experiment_module() -> Any:
    """``experiments/avmnist.py`` (a script) loaded by path, once per process."""
    module = sys.modules.get(_EXPERIMENT_MODULE)
    if module is None:
        spec = importlib.util.spec_from_file_location(
            _EXPERIMENT_MODULE, ROOT / "experiments" / "avmnist.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[_EXPERIMENT_MODULE] = module  # dataclasses resolve through it
        spec.loader.exec_module(module)
    return module


def make_data(*, data_seed: int = 0, num_train: int | None = None,
              num_val: int | None = None, num_test: int | None = None) -> dict[str, Any]:
    """The arrays ``experiments/avmnist.py`` trains on for this data seed and subset.

    Calls the experiment's own ``make_data`` (its default SNR and audio
    standardisation), so both tables see identical arrays.

    Args:
      data_seed: ``load_avmnist``'s seed.
      num_train, num_val, num_test: the first examples of each split (None: all).

    Returns:
      ``{"train", "val", "test"}`` -> ``{"image": float32 [n, 28, 28, 1], "audio":
      (log_mel float32 [n, 126, 64], mask bool [n, 126]), "label": int32 [n]}``, plus
      ``"audio_stats"``.
    """
    experiment = _experiment_module()
    config = experiment.AVMNISTConfig(data_seed=data_seed, num_train=num_train,
                                      num_val=num_val, num_test=num_test)
    return experiment.make_data(config)


def _tensors(split: Mapping[str, Any], method: str) -> dict[str, torch.Tensor | None]:
    """A split's arrays as CPU tensors sharing their memory (NCHW, labels int64)."""
    log_mel, mask = split["audio"]
    return {
        "image": (torch.as_tensor(split["image"]).permute(0, 3, 1, 2)
                  if method != "audio" else None),  # [n, 1, 28, 28] (a view)
        "log_mel": torch.as_tensor(log_mel) if method != "image" else None,  # [n, 126, 64]
        "mask": torch.as_tensor(mask) if method != "image" else None,  # [n, 126]
        "label": torch.as_tensor(np.asarray(split["label"], np.int64)),  # [n]
    }


def _batch(tensors: Mapping[str, torch.Tensor | None], index: torch.Tensor | slice,
           ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """``(image [b, 1, 28, 28], log_mel [b, 1, 126, 64] zero outside the mask, label)``."""
    image = tensors["image"]
    if image is not None:
        image = image[index].contiguous()
    audio = tensors["log_mel"]
    if audio is not None:
        audio = torch.where(tensors["mask"][index][:, None, :, None], audio[index][:, None],
                            0.0)
    return image, audio, tensors["label"][index]


# --------------------------------------------------------------------------- training


def _use_threads(num_threads: int | None) -> int:
    """Sets torch's intra-op threads (None: every core this process may use)."""
    torch.set_num_threads(num_threads or len(os.sched_getaffinity(0)))
    return torch.get_num_threads()


def _train_epoch(model: LateFusionClassifier, optimizer: torch.optim.Optimizer,
                 tensors: Mapping[str, torch.Tensor | None], *, batch_size: int,
                 generator: torch.Generator, clip_norm: float | None,
                 progress: bool) -> tuple[float, int]:
    """One shuffled pass; returns (mean training loss, examples trained on)."""
    model.train()
    n = len(tensors["label"])
    order = torch.randperm(n, generator=generator)
    starts = [s for s in range(0, n, batch_size) if min(batch_size, n - s) > 1]
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, leave=False, desc="train")
    total, seen = torch.zeros(()), 0
    for start in starts:
        image, audio, label = _batch(tensors, order[start:start + batch_size])
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(image, audio), label)
        loss.backward()
        if clip_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        total += loss.detach() * len(label)
        seen += len(label)
    return float(total) / max(seen, 1), seen


def _evaluate(model: LateFusionClassifier, tensors: Mapping[str, torch.Tensor | None], *,
              batch_size: int) -> tuple[float, np.ndarray]:
    """Eval-mode accuracy and predictions ``int64 [n]`` over a split, in order."""
    model.eval()
    n = len(tensors["label"])
    predictions = []
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            image, audio, _ = _batch(tensors, slice(start, start + batch_size))
            predictions.append(model(image, audio).argmax(dim=1))
    predicted = torch.cat(predictions).numpy()
    return float(np.mean(predicted == tensors["label"].numpy())), predicted


def train_run(method: str, seed: int, data: Mapping[str, Any], *, epochs: int = 5,
              batch_size: int = 40, lr: float = 0.1, weight_decay: float = 1e-4,
              clip_norm: float | None = CLIP_NORM, eval_batch_size: int | None = None,
              audio_pool: str = "ceil", num_threads: int | None = None,
              progress: bool = False) -> dict[str, Any]:
    """Trains one MultiBench AV-MNIST model and scores its best validation epoch.

    ``torch.manual_seed(seed)`` before building the model (initialisation); each
    epoch's shuffle comes from a ``torch.Generator`` seeded with ``seed``. After every
    epoch the validation accuracy is measured in eval mode; the state of the first
    epoch with the highest accuracy is kept (a deep copy of ``state_dict``) and the
    test split is scored once, with it. Sets torch's thread count for the process.

    Args:
      method: ``"image"``, ``"audio"`` or ``"concat"``.
      seed: initialisation and shuffling seed.
      data: ``make_data``'s dict: ``"train"``, ``"val"``, ``"test"`` each with
        ``"image"`` float32 ``[n, 28, 28, 1]``, ``"audio"`` (log_mel float32
        ``[n, 126, 64]``, mask bool ``[n, 126]``) and ``"label"`` int ``[n]``. Not
        modified (frames outside the mask are zeroed per batch).
      epochs: passes over the training split.
      batch_size: training batch size.
      lr: SGD learning rate (no momentum).
      weight_decay: SGD weight decay, on every parameter as in MultiBench.
      clip_norm: gradient norm clipping (None: none).
      eval_batch_size: validation/test batch size (None: ``batch_size``).
      audio_pool: ``"ceil"`` or ``"floor"`` (see ``LateFusionClassifier``).
      num_threads: torch intra-op threads (None: every usable core).
      progress: a tqdm bar over each epoch's batches.

    Returns:
      ``{"test_accuracy", "val_accuracy" (the best epoch's), "best_epoch" (1-based),
      "epochs", "history": [{"epoch", "train_loss", "val_accuracy", "train_seconds",
      "val_seconds"}], "examples_per_second" (training examples / training-only time),
      "seconds_per_epoch" (mean of training + validation time per epoch), "params",
      "num_threads", "mkldnn_enabled"}``.

    Raises:
      ValueError: an unknown method or pooling, ``epochs < 1`` or ``batch_size < 2``
        (batch norm needs two examples).
    """
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}.")
    eval_batch_size = eval_batch_size or batch_size
    threads = _use_threads(num_threads)
    torch.manual_seed(seed)
    model = LateFusionClassifier(method, audio_pool=audio_pool)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    train, val, test = (_tensors(data[s], method) for s in ("train", "val", "test"))

    history, best_state, best_accuracy, best_epoch = [], None, -1.0, 0
    examples = train_time = 0.0
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        loss, seen = _train_epoch(model, optimizer, train, batch_size=batch_size,
                                  generator=generator, clip_norm=clip_norm,
                                  progress=progress)
        trained = time.perf_counter()
        accuracy, _ = _evaluate(model, val, batch_size=eval_batch_size)
        done = time.perf_counter()
        examples, train_time = examples + seen, train_time + (trained - start)
        history.append({"epoch": epoch, "train_loss": round(loss, 6),
                        "val_accuracy": accuracy, "train_seconds": round(trained - start, 3),
                        "val_seconds": round(done - trained, 3)})
        if accuracy > best_accuracy:  # MultiBench: strictly better only
            best_accuracy, best_epoch = accuracy, epoch
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    test_accuracy, _ = _evaluate(model, test, batch_size=eval_batch_size)
    epoch_seconds = [h["train_seconds"] + h["val_seconds"] for h in history]
    return {
        "test_accuracy": test_accuracy, "val_accuracy": best_accuracy,
        "best_epoch": best_epoch, "epochs": epochs, "history": history,
        "examples_per_second": round(examples / train_time, 1),
        "seconds_per_epoch": round(float(np.mean(epoch_seconds)), 3),
        "params": param_count(model), "num_threads": threads,
        "mkldnn_enabled": bool(torch.backends.mkldnn.enabled),
    }


def epoch_throughput(data: Mapping[str, Any], *, method: str = "concat",
                     batch_size: int = 40, epochs: int = 1, include_validation: bool = True,
                     seed: int = 0, num_threads: int | None = None) -> dict[str, float]:
    """Training speed of the recipe: ``epochs`` passes (with validation), timed.

    The same model, optimiser, batching and per-batch masking as ``train_run``, with
    no best-epoch bookkeeping and no test pass; the model starts from ``seed``. The
    first step's one-off setup (a few milliseconds) is inside the timing. Sets torch's
    thread count for the process.

    Args:
      data: ``make_data``'s dict (``"train"``; ``"val"`` when ``include_validation``).
      method: ``"image"``, ``"audio"`` or ``"concat"``.
      batch_size: training (and validation) batch size.
      epochs: passes over the training split.
      include_validation: also run the eval-mode validation pass after each epoch
        (inside the timing, as ``seconds_per_epoch`` in the records).
      seed: initialisation and shuffling seed.
      num_threads: torch intra-op threads (None: every usable core).

    Returns:
      ``{"examples_per_second": training examples / seconds, "seconds": wall time of
      all epochs (and validation passes)}``.
    """
    _use_threads(num_threads)
    torch.manual_seed(seed)
    model = LateFusionClassifier(method)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    train = _tensors(data["train"], method)
    val = _tensors(data["val"], method) if include_validation else None
    examples = 0
    start = time.perf_counter()
    for _ in range(epochs):
        examples += _train_epoch(model, optimizer, train, batch_size=batch_size,
                                 generator=generator, clip_norm=CLIP_NORM, progress=False)[1]
        if val is not None:
            _evaluate(model, val, batch_size=batch_size)
    seconds = time.perf_counter() - start
    return {"examples_per_second": examples / seconds, "seconds": seconds}


# ----------------------------------------------------------------------------- ledger

_DEFAULTS = {"data_seed": 0, "epochs": 5, "num_train": None, "num_val": None,
             "num_test": None, "results": "results"}


def run_config(method: str, *, data_seed: int = 0, epochs: int = 5,
               num_train: int | None = None, num_val: int | None = None,
               num_test: int | None = None) -> dict[str, Any]:
    """Everything a peer run's record depends on (its ``config``; hashed).

    Args:
      method: ``"image"``, ``"audio"`` or ``"concat"``.
      data_seed, epochs, num_train, num_val, num_test: as on the command line.

    Returns:
      A JSON-ready dict: the recipe, its hyperparameters and the data it trains on.
    """
    data = _experiment_module().AVMNISTConfig()
    return {
        "recipe": "multibench_avmnist", "recipe_version": RECIPE_VERSION,
        "framework": "pytorch", "method": method,
        "image_lenet": [1, 6, 3] if method != "audio" else None,
        "audio_lenet": [1, 6, 5] if method != "image" else None,
        "audio_pool": "ceil", "hidden": HIDDEN, "optimizer": "sgd", "learning_rate": 0.1,
        "momentum": 0.0, "weight_decay": 1e-4, "clip_grad_norm": CLIP_NORM,
        "batch_size": 40, "eval_batch_size": 40, "epochs": epochs, "data_seed": data_seed,
        "snr_db": data.snr_db, "normalize_audio": data.normalize_audio,
        "num_train": num_train, "num_val": num_val, "num_test": num_test,
    }


def run_command(method: str, seed: int, args: argparse.Namespace) -> str:
    """The command line (from the repository root) that retrains just this run."""
    parts = ["python benchmarks/peers/multibench_avmnist.py", f"--methods {method}",
             f"--seeds {seed}"]
    for name, default in _DEFAULTS.items():
        value = getattr(args, name)
        if value != default:
            parts.append(f"--{name.replace('_', '-')} {shlex.quote(str(value))}")
    return " ".join([*parts, "--force"])


def _settings(method: str, args: argparse.Namespace) -> dict[str, Any]:
    return run_config(method, data_seed=args.data_seed, epochs=args.epochs,
                      num_train=args.num_train, num_val=args.num_val, num_test=args.num_test)


def plan(args: argparse.Namespace) -> tuple[list[Any], int]:
    """The runs this invocation trains (missing or stale, or all with ``--force``, then
    ``--shard``), and how many of the requested runs already have a current record."""
    from lepton_mm import experiment as ledger

    book = ledger.Ledger(args.results, EXPERIMENT)
    keys = [ledger.RunKey(EXPERIMENT, METHODS[m], s, args.data_seed)
            for m in args.methods for s in args.seeds]
    hashes = {METHODS[m]: ledger.config_hash(_settings(m, args)) for m in args.methods}
    todo = book.todo(keys, config_hashes=hashes, numerics=ledger.NUMERICS)
    current = len(keys) - len(todo)
    return ledger.shard(keys if args.force else todo, args.shard), current


def _record(method: str, seed: int, args: argparse.Namespace,
            data: Mapping[str, Any]) -> dict[str, Any]:
    from lepton_mm import experiment as ledger

    scoped = ledger.reset_peak_rss()
    out = train_run(method, seed, data, epochs=args.epochs, progress=args.progress)
    metrics = {k: out[k] for k in ("test_accuracy", "val_accuracy", "best_epoch", "epochs",
                                   "history", "examples_per_second")}
    return ledger.make_record(
        ledger.RunKey(EXPERIMENT, METHODS[method], seed, args.data_seed),
        command=run_command(method, seed, args), config=_settings(method, args),
        numerics=ledger.NUMERICS, metrics=metrics, robustness=None, params=out["params"],
        seconds_per_epoch=out["seconds_per_epoch"],
        peak_rss_mb=round(ledger.peak_rss_mb(), 1),
        machine=ledger.machine_info(device_kind="cpu"),
        versions=ledger.versions(packages=("torch", "numpy", "lepton_mm")),
        extra={"torch_runtime": {"num_threads": out["num_threads"],
                                 "mkldnn_enabled": out["mkldnn_enabled"]},
               # the data arrays are loaded before the run: "process" includes them
               "peak_rss_scope": "run" if scoped else "process"})


# -------------------------------------------------------------------------------- CLI


def _list(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        items = [kind(s.strip()) for s in text.split(",") if s.strip()]
        if not items or len(set(items)) != len(items):
            raise argparse.ArgumentTypeError(f"expected distinct comma-separated values, "
                                             f"got {text!r}")
        return items
    return parse


def _method(text: str) -> str:
    if text not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {text!r} (known: "
                                         f"{', '.join(METHODS)})")
    return text


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected seeds >= 0, got {text!r}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line -> arguments; nonsensical values exit with a one-line usage error."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", type=_list(_method), default=list(METHODS),
                        help="comma-separated: image, audio, concat (default: all)")
    parser.add_argument("--seeds", type=_list(_seed), default=[0, 1, 2], help="e.g. 0,1,2")
    parser.add_argument("--data-seed", type=_seed, default=0)
    parser.add_argument("--epochs", type=_count, default=5)
    parser.add_argument("--num-train", type=_count, default=None)
    parser.add_argument("--num-val", type=_count, default=None)
    parser.add_argument("--num-test", type=_count, default=None)
    parser.add_argument("--results", default="results", help="ledger root")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="train every N-th run still to do, starting at I (0-based)")
    parser.add_argument("--force", action="store_true",
                        help="retrain runs whose record is current too")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction,
                        default=sys.stdout.isatty(), help="tqdm bars over batches")
    args = parser.parse_args(argv)
    from lepton_mm.experiment import shard

    try:
        shard([], args.shard)
    except ValueError as e:
        parser.error(str(e))
    from lepton_mm.data.avmnist import SPLIT_SIZES

    for split, size in SPLIT_SIZES.items():
        n = getattr(args, f"num_{split}")
        if n is not None and n > size:
            parser.error(f"--num-{split}: the split has {size} examples, got {n}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from lepton_mm.experiment import Ledger

    todo, current = plan(args)
    requested = len(args.methods) * len(args.seeds)
    print(f"{current} of {requested} runs have a current record; training {len(todo)}"
          + (f" (shard {args.shard})" if args.shard else ""), flush=True)
    if not todo:
        return 0
    data = make_data(data_seed=args.data_seed, num_train=args.num_train,
                     num_val=args.num_val, num_test=args.num_test)
    book = Ledger(args.results, EXPERIMENT)
    by_name = {v: k for k, v in METHODS.items()}
    for count, key in enumerate(todo, 1):
        print(f"[{count}/{len(todo)}] {key.label()}", flush=True)
        record = _record(by_name[key.method], key.seed, args, data)
        path = book.write(record)
        m = record["metrics"]
        print(f"        test accuracy {100 * m['test_accuracy']:.2f} %  (val "
              f"{100 * m['val_accuracy']:.2f} %, best epoch {m['best_epoch']}, "
              f"{record['seconds_per_epoch']} s/epoch, {m['examples_per_second']} "
              f"train examples/s) -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
