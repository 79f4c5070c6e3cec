"""Fusion inside a PPO agent: Catch (gymnax) seen as pixels and as a state vector.

The environment is bsuite's Catch as gymnax implements it (a ball falls from a random
column of a 10 x 5 board; the paddle moves left, stays or moves right; +1 for a catch,
-1 for a miss after 9 steps), seen through two modalities made from the same state
(``lepton_mm.rl.make_env``): ``pixels``, the board as a float32 ``[10, 5, 1]`` image,
read by an ``ImageCNN`` (``PixelEncoder``), and ``state``, ball column, ball row and
paddle column scaled to [0, 1], read by an MLP (``StateEncoder``).

Each modality alone suffices to play perfectly, so the experiment asks how fast each
observation path learns, what a fusion layer costs or gains over the better single
modality, and what an agent trained on both does when one is missing at test time
(``batch["present"]``, the library's presence masks). A policy that ignores the ball
catches it with probability exactly 1/5 (return -0.6), whatever it does.

Methods: a fusion name in ``lepton_mm.fusion.FUSIONS`` (both modalities; the table uses
``concat``, ``gated`` and ``attention``), ``pixels_only`` / ``state_only``, or a fusion
name with ``+mdrop``, trained with modality dropout (``lepton_mm.fusion.modality_dropout``
draws the presence flags of every environment at every step; the PPO update sees the
flags the policy acted on). The agent is ``lepton_mm.rl.make_agent``'s actor-critic
(encoders, the fusion layer, three action logits and a value); ``lepton_mm.rl.make_ppo``
trains it with PPO (Schulman et al. 2017) on 16 environments stepped together, the
whole run one ``jax.jit``-compiled ``lax.scan`` (rlax's GAE, clipped surrogate and
entropy bonus; optax's gradient-norm clip and Adam).

Ledger records (``results/rl_fusion/<method>/seed<k>.json``, ``lepton_mm.harness``)
hold the learning curve (the mean return of the training episodes that ended in each
rollout, against environment steps) and the test returns of 2 560 episodes with every
modality present and with each one missing. The ledger's ``test_accuracy`` and
``val_accuracy`` fields hold catch rates, ``(return + 1) / 2``: of the test episodes,
and of the training episodes of the last tenth of training; ``seconds_per_epoch`` holds
seconds per update (one rollout and its PPO epochs), after compiling. A run takes under
a minute, so it is not checkpointed: an interrupted run starts again.

    python experiments/rl_fusion.py --quick     # concat and state_only, short: ~1 min
    python experiments/rl_fusion.py --seeds 0,1,2             # the table: 18 runs, ~15 min
    python experiments/rl_fusion.py --methods low_rank,gated+mdrop --seeds 0,1,2
    python experiments/rl_fusion.py --seeds 0,1,2 --report --out runs/rl_fusion_report \
        --docs docs/results.md

Needs the ``rl`` extra: ``pip install -e ".[rl]"`` (gymnax, rlax).

References:
  Schulman et al., "Proximal Policy Optimization Algorithms", 2017.
  https://arxiv.org/abs/1707.06347
  Osband et al., "Behaviour Suite for Reinforcement Learning", ICLR 2020 (Catch).
  Lange, "gymnax: A JAX-based Reinforcement Learning Environment Library", 2022.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from lepton_mm import harness
from lepton_mm.experiment import RunKey, format_mean_std
from lepton_mm.fusion import FUSIONS
from lepton_mm.harness import seed_stats_of
from lepton_mm.rl import (
    ENVIRONMENTS,
    AgentConfig,
    PPOConfig,
    Trial,
    steps_to_return,
    train_and_test,
)

#: The modalities every environment here offers (``EnvSpec.modalities``).
MODALITIES = ("pixels", "state")
#: The table's fusion methods; any name in ``lepton_mm.fusion.FUSIONS`` is a method too.
FUSION_METHODS = ("concat", "gated", "attention")
#: Single-modality methods: ``<modality>_only``.
SINGLE_SUFFIX = "_only"
#: ``<fusion>+mdrop``: the fusion method trained with modality dropout.
MDROP_SUFFIX = "+mdrop"
METHODS = (*FUSION_METHODS, f"concat{MDROP_SUFFIX}",
           *(f"{m}{SINGLE_SUFFIX}" for m in MODALITIES))
#: Test conditions: name → the modalities marked absent.
CONDITIONS = {"all": (), "no_pixels": ("pixels",), "no_state": ("state",)}
#: The exact return of any policy that ignores the ball (module docstring).
BLIND_RETURN = -0.6


@dataclasses.dataclass(frozen=True)
class RLFusionConfig:
    """Everything the experiment needs (``quick_config()`` for the fast variant).

    Attributes:
      methods: fusion names and/or ``pixels_only``, ``state_only``; empty: ``METHODS``.
      seeds: one run per method and seed (initialisation, environments, sampling).
      workdir: scratch folder (the JAX compilation cache); results: the ledger's root.
      env: a key of ``lepton_mm.rl.ENVIRONMENTS``.
      total_steps: environment steps per run (all environments together).
      num_envs: environments stepped in parallel (``jax.vmap``).
      rollout_steps: steps per environment between two updates.
      update_epochs, minibatches: PPO passes over each rollout, and minibatches per pass.
      learning_rate: Adam's rate, annealed linearly to 0 over the run.
      gamma, gae_lambda: discount and GAE mixing.
      clip_epsilon: PPO's ratio clip (also clips the value update).
      entropy_coef, value_coef: weights of the entropy bonus and the value loss.
      max_grad_norm: global gradient-norm clip.
      dim: each encoder's output size.
      hidden: the fused (or single) feature size.
      cnn_widths: the pixel encoder's convolution widths (3 x 3, no pooling).
      modality_dropout: the rate at which ``+mdrop`` methods hide each modality per
        environment and step while training (``lepton_mm.fusion.modality_dropout``; one
        modality is always kept).
      eval_envs, eval_steps: test episodes run ``eval_envs`` environments for
        ``eval_steps`` steps (Catch: 9 steps an episode).
      progress: unused (the run is one compiled call); quick: set by ``quick_config``.
    """

    methods: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    workdir: str = "runs/rl_fusion"
    results: str = "results"
    env: str = "catch"
    total_steps: int = 81_920
    num_envs: int = 16
    rollout_steps: int = 32
    update_epochs: int = 4
    minibatches: int = 4
    learning_rate: float = 1e-3
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_epsilon: float = 0.2
    entropy_coef: float = 0.01
    value_coef: float = 0.5
    max_grad_norm: float = 0.5
    dim: int = 32
    hidden: int = 32
    cnn_widths: tuple[int, ...] = (16, 16)
    modality_dropout: float = 0.3
    eval_envs: int = 256
    eval_steps: int = 90
    progress: bool | None = None
    quick: bool = False

    def __post_init__(self) -> None:
        for name in ("methods", "seeds", "cnn_widths"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct seeds, got {list(self.seeds)}.")
        if self.env not in ENVIRONMENTS:
            raise ValueError(f"env: unknown environment {self.env!r}. Known: "
                             f"{sorted(ENVIRONMENTS)}.")
        self.agent(METHODS[0])  # the library configs' own checks, the dropout rate's too
        self.ppo(f"concat{MDROP_SUFFIX}")

    def agent(self, method: str) -> AgentConfig:
        """The actor-critic of ``method`` (``parse_method``)."""
        fusion, modalities, _ = parse_method(method)
        return AgentConfig(fusion, modalities, self.dim, self.hidden, self.cnn_widths)

    def ppo(self, method: str) -> PPOConfig:
        """PPO's settings for ``method``: modality dropout only for ``+mdrop`` methods."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(PPOConfig)}
        dropout = self.modality_dropout if parse_method(method).modality_dropout else None
        return PPOConfig(**{**fields, "modality_dropout": dropout})


def quick_config(**overrides: Any) -> RLFusionConfig:
    """``--quick``: ``concat`` and ``state_only``, one seed, 16 384 steps; records under
    ``WORKDIR/results``, never in the committed ledger."""
    base = dict(methods=("concat", "state_only"), seeds=(0,), total_steps=16_384,
                quick=True, workdir="runs/rl_fusion_quick")
    merged = {**base, **overrides}
    merged.setdefault("results", str(Path(merged["workdir"]) / "results"))
    return RLFusionConfig(**merged)


# -------------------------------------------------------------------------- methods


class Method(NamedTuple):
    """What a method name means (``parse_method``).

    Attributes:
      fusion: a name in ``lepton_mm.fusion.FUSIONS``, or None for one modality.
      modalities: the modalities the agent observes, sorted.
      modality_dropout: trained with modality dropout (``+mdrop``).
    """

    fusion: str | None
    modalities: tuple[str, ...]
    modality_dropout: bool


def parse_method(method: str) -> Method:
    """What a method name means.

    Args:
      method: a name in ``lepton_mm.fusion.FUSIONS`` (both modalities), that name
        followed by ``+mdrop`` (trained with modality dropout), or ``<modality>_only``.

    Returns:
      ``Method("concat", ("pixels", "state"), False)``, ``Method(None, ("state",),
      False)``, ...

    Raises:
      ValueError: an unknown fusion or modality (the message names ``methods``).
    """
    if method.endswith(SINGLE_SUFFIX):
        modality = method[:-len(SINGLE_SUFFIX)]
        if modality not in MODALITIES:
            raise ValueError(f"methods: {method!r} names an unknown modality {modality!r}. "
                             f"Known: {list(MODALITIES)}.")
        return Method(None, (modality,), False)
    fusion = method.removesuffix(MDROP_SUFFIX)
    if fusion not in FUSIONS:
        raise ValueError(f"methods: unknown method {method!r}: neither a fusion "
                         f"({sorted(FUSIONS)}, optionally with {MDROP_SUFFIX!r}) nor "
                         f"<modality>{SINGLE_SUFFIX} "
                         f"({[m + SINGLE_SUFFIX for m in MODALITIES]}).")
    return Method(fusion, MODALITIES, fusion != method)


def resolve_methods(config: RLFusionConfig) -> list[str]:
    """The methods to run, validated before any computation."""
    methods = list(dict.fromkeys(config.methods)) or list(METHODS)
    for m in methods:
        parse_method(m)
    return methods


# -------------------------------------------------------------------------- one run


#: The training return ``steps_to_return`` waits for in the table (0.8: 90 % catches).
THRESHOLD = 0.8


def catch_rate(episode_return: float) -> float:
    """Catch's fraction of balls caught from the mean return (+1 caught, -1 missed)."""
    return (episode_return + 1.0) / 2.0


def record_metrics(trial: Trial) -> dict[str, Any]:
    """A trial as a record's metrics (JSON; returns rounded to 4 digits).

    Args:
      trial: one run's ``lepton_mm.rl.train_and_test``.

    Returns:
      ``{"test_accuracy", "val_accuracy"`` (catch rates of ``test_return["all"]`` and
      ``final_return``), ``"test_return"``, ``"test_episodes"`` (``{condition:
      value}``), ``"random_return"``, ``"final_return"``, ``"curve"`` (lists, one entry
      per update: ``env_steps``, ``return`` (None where no episode ended), ``episodes``,
      ``loss``, ``entropy``) and ``"steps_to_return_0.8"``}``.
    """
    c, final = trial.curve, round(trial.final_return, 4)
    curve = {"env_steps": c["env_steps"].tolist(),
             "return": [round(float(r), 4) if e else None
                        for r, e in zip(c["return"], c["episodes"], strict=True)],
             "episodes": c["episodes"].astype(int).tolist(),
             "loss": np.round(c["loss"], 5).tolist(),
             "entropy": np.round(c["entropy"], 5).tolist()}
    tested = {k: round(v, 4) for k, v in trial.test_return.items()}
    return {"test_accuracy": catch_rate(tested["all"]), "val_accuracy": catch_rate(final),
            "test_return": tested, "test_episodes": trial.test_episodes,
            "random_return": round(trial.random_return, 4), "final_return": final,
            "curve": curve, "steps_to_return_0.8": steps_to_return(curve, THRESHOLD)}


# --------------------------------------------------------------------------- ledger


class RLFusion(harness.Experiment):
    """One run per (method, seed): a PPO agent trained from scratch and tested with
    every modality present and with each one absent."""

    name, script = "rl_fusion", "experiments/rl_fusion.py"
    figures = ("curves.png",)
    flags = tuple((field, "--" + field.replace("_", "-")) for field in (
        "env", "total_steps", "num_envs", "rollout_steps", "update_epochs", "minibatches",
        "learning_rate", "gamma", "gae_lambda", "clip_epsilon", "entropy_coef",
        "value_coef", "max_grad_norm", "dim", "hidden", "cnn_widths", "modality_dropout",
        "eval_envs", "eval_steps"))

    def methods(self) -> list[str]:
        return resolve_methods(self.config)

    def default_config(self) -> RLFusionConfig:
        return quick_config() if self.config.quick else RLFusionConfig()

    def run_config(self, method: str) -> dict[str, Any]:
        """The settings ``method``'s result depends on (``modality_dropout`` only for
        ``+mdrop`` methods)."""
        out = super().run_config(method)
        if not parse_method(method).modality_dropout:
            del out["modality_dropout"]
        return out

    def train(self, key: RunKey, data: Any, workdir: Path) -> dict[str, Any]:
        """Trains and tests one run (a minute or two; nothing to resume): keys from
        ``jax.random.key(seed)``, parameters from ``nnx.Rngs(seed)``."""
        ppo = self.config.ppo(key.method)
        trial = train_and_test(self.config.env, self.config.agent(key.method), ppo,
                               key=jax.random.key(key.seed), rngs=nnx.Rngs(key.seed),
                               conditions=CONDITIONS)
        seconds = round(trial.train_seconds, 2)
        return {"metrics": record_metrics(trial), "params": trial.params,
                "seconds_per_epoch": round(seconds / ppo.num_updates, 4),
                "extra": {"compile_seconds": round(trial.compile_seconds, 2),
                          "train_seconds": seconds}}

    def describe(self, record: Mapping[str, Any]) -> str:
        m = record["metrics"]
        t = m["test_return"]
        return (f"test return {t['all']:+.2f} (no pixels {t['no_pixels']:+.2f}, no state "
                f"{t['no_state']:+.2f}), final training return {m['final_return']:+.2f}, "
                f"{record['train_seconds']} s")

    def summarize(self, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        """Per method: the seeds; test returns per condition, the final training return
        and the steps to a training return of ``THRESHOLD`` (``seed_stats``); the
        learning curve's mean and sample std over seeds at each update; parameters,
        seconds of training and of compiling."""
        out = {}
        for method, rs in runs.items():
            curves = np.array([[np.nan if v is None else v
                                for v in r["metrics"]["curve"]["return"]] for r in rs], float)
            out[method] = {
                "seeds": [r["seed"] for r in rs],
                "modalities": list(parse_method(method).modalities),
                "test_return": {
                    c: seed_stats_of(rs, lambda r, c=c: r["metrics"]["test_return"][c])
                    for c in CONDITIONS},
                "random_return": seed_stats_of(rs, lambda r: r["metrics"]["random_return"]),
                "final_return": seed_stats_of(rs, lambda r: r["metrics"]["final_return"]),
                "steps_to_return_0.8": {
                    "per_seed": {str(r["seed"]): r["metrics"]["steps_to_return_0.8"] for r in rs},
                    "stats": seed_stats_of(rs, lambda r: r["metrics"]["steps_to_return_0.8"])},
                "curve": {"env_steps": rs[0]["metrics"]["curve"]["env_steps"],
                          "mean": np.round(np.nanmean(curves, 0), 4).tolist(),
                          "std": (np.round(np.nanstd(curves, 0, ddof=1), 4).tolist()
                                  if len(rs) > 1 else None)},
                "params": rs[0]["params"],
                "train_seconds": float(np.mean([r["train_seconds"] for r in rs])),
                "compile_seconds": float(np.mean([r["compile_seconds"] for r in rs])),
            }
        return out

    def tables(self, summary: dict[str, Any]) -> str:
        """Returns (mean ± sample std over seeds) and sample efficiency, per method."""
        def cell(stats: Mapping[str, Any] | None) -> str:
            return format_mean_std(stats, percent=False, digits=2)

        lines = ["| method | modalities | params | env steps to training return 0.8 | "
                 "final training return | test return, all present | without pixels | "
                 "without state | seeds |", "|---|---|---|---|---|---|---|---|---|"]
        for method, s in summary.items():
            reached = s["steps_to_return_0.8"]
            if reached["stats"] is not None:
                steps = format_mean_std(
                    {**reached["stats"], "mean": reached["stats"]["mean"] / 1000,
                     "std": None if reached["stats"]["std"] is None
                     else reached["stats"]["std"] / 1000}, percent=False, digits=1) + " k"
            else:
                never = sum(v is None for v in reached["per_seed"].values())
                steps = f"not reached ({never} of {len(reached['per_seed'])} seeds)"
            t = s["test_return"]
            lines.append(
                f"| {method} | {' + '.join(s['modalities'])} | {s['params']:,} | {steps} | "
                f"{cell(s['final_return'])} | {cell(t['all'])} | {cell(t['no_pixels'])} | "
                f"{cell(t['no_state'])} | {len(s['seeds'])} |")
        any_method = next(iter(summary.values()))
        lines += ["", f"Uniformly random actions: test return "
                      f"{cell(any_method['random_return'])} (exact: {BLIND_RETURN}). "
                      f"Training time per run: "
                      + ", ".join(f"{m} {s['train_seconds']:.0f} s" for m, s in summary.items())
                      + " (after compiling, "
                      + ", ".join(f"{s['compile_seconds']:.0f}" for s in summary.values())
                      + " s)."]
        return "\n".join(lines) + "\n"

    def report_fields(self) -> dict[str, Any]:
        return {"env": self.config.env, "total_steps": self.config.total_steps,
                "metric": "mean episode return (+1 catch, -1 miss); mean and sample std "
                          "over seeds; test: 2 560 episodes of the sampling policy"}

    def plot(self, summary: dict[str, Any], out: Path) -> list[Path]:
        """``curves.png``: training return against environment steps, a line per method
        (mean over seeds) with a band of ± one sample std."""
        from matplotlib.figure import Figure  # not pyplot: leaves the backend alone

        fig = Figure(figsize=(6.4, 3.6), dpi=100)
        ax = fig.subplots()
        for method, s in summary.items():
            x = np.asarray(s["curve"]["env_steps"]) / 1000
            mean = np.asarray(s["curve"]["mean"], float)
            style = ("--" if method.endswith(SINGLE_SUFFIX) else
                     ":" if method.endswith(MDROP_SUFFIX) else "-")
            (line,) = ax.plot(x, mean, style, lw=1.4, label=f"{method} ({len(s['seeds'])})")
            if s["curve"]["std"] is not None:
                std = np.asarray(s["curve"]["std"], float)
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15,
                                lw=0)
        ax.axhline(BLIND_RETURN, color="grey", lw=0.8, ls=":")
        ax.text(0.25 * self.config.total_steps / 1000, BLIND_RETURN + 0.03,
                "a policy that ignores the ball", color="grey", fontsize=8)
        ax.set(xlabel="environment steps (thousands)", ylabel="training episode return",
               title="PPO on Catch (gymnax): fusion vs single modality", ylim=(-1.05, 1.05))
        ax.legend(fontsize=8, loc="lower right", title="method (seeds)", title_fontsize=8)
        fig.tight_layout()
        path = out / "curves.png"
        fig.savefig(path)
        return [path]


def parse_args(argv: list[str] | None = None) -> tuple[RLFusionConfig, argparse.Namespace]:
    """Command line → ``(RLFusionConfig, the parsed arguments)``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated: fusion names or <modality>_only (default: "
                             f"{','.join(METHODS)}; --quick: concat,state_only)")
    harness.add_arguments(parser, quick="concat and state_only, one seed, 16 384 steps")
    harness.add_flags(parser, RLFusion, RLFusionConfig)
    args = parser.parse_args(argv)
    overrides = {**harness.base_overrides(parser, args, "rl_fusion"),
                 **harness.config_file(parser, args, RLFusionConfig),
                 **harness.flag_overrides(args, RLFusion)}
    if args.methods is not None:
        overrides["methods"] = tuple(m for m in args.methods.split(",") if m)
    return harness.make_config(parser, quick_config if args.quick else RLFusionConfig,
                               overrides), args


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    return harness.run_main(RLFusion(config), args)


if __name__ == "__main__":
    sys.exit(main())
