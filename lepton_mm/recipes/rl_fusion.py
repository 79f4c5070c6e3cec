"""Fusion inside a PPO agent on Catch: the config, the method names and one run's metrics.

The environment is bsuite's Catch as gymnax implements it, seen through two modalities
made from the same state (``lepton_mm.rl.make_env``): ``pixels``, the board as a float32
``[10, 5, 1]`` image, and ``state``, ball column, ball row and paddle column scaled to
[0, 1]. A method is a fusion name in ``lepton_mm.fusion.FUSIONS`` (both modalities), that
name with ``+mdrop`` (trained with modality dropout) or ``<modality>_only``
(``parse_method``); ``RLFusionConfig.agent`` and ``RLFusionConfig.ppo`` turn a method
into ``lepton_mm.rl``'s ``AgentConfig`` and ``PPOConfig``, and ``record_metrics`` turns
the ``Trial`` of ``lepton_mm.rl.train_and_test`` into a ledger record's metrics.
``experiments/rl_fusion.py`` trains the table from these; ``notebooks/05_rl_fusion.ipynb``
walks through them.

A catch is +1 and a miss -1 after 9 steps; a policy that ignores the ball catches it
with probability exactly 1/5 (``BLIND_RETURN``), whatever it does.

References:
  Schulman et al., "Proximal Policy Optimization Algorithms", 2017.
  https://arxiv.org/abs/1707.06347
  Osband et al., "Behaviour Suite for Reinforcement Learning", ICLR 2020 (Catch).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lepton_mm.fusion import FUSIONS
from lepton_mm.rl import ENVIRONMENTS, AgentConfig, PPOConfig, Trial, steps_to_return

__all__ = [
    "BLIND_RETURN",
    "CONDITIONS",
    "FUSION_METHODS",
    "MDROP_SUFFIX",
    "METHODS",
    "MODALITIES",
    "SINGLE_SUFFIX",
    "THRESHOLD",
    "Method",
    "RLFusionConfig",
    "catch_rate",
    "parse_method",
    "quick_config",
    "record_metrics",
    "resolve_methods",
]

#: The modalities every environment here offers (``EnvSpec.modalities``).
MODALITIES = ("pixels", "state")
#: The table's fusion methods; any name in ``lepton_mm.fusion.FUSIONS`` is a method too.
FUSION_METHODS = ("concat", "gated", "attention")
#: Single-modality methods: ``<modality>_only``.
SINGLE_SUFFIX = "_only"
#: ``<fusion>+mdrop``: the fusion method trained with modality dropout.
MDROP_SUFFIX = "+mdrop"
#: The methods of the table (the default).
METHODS = (*FUSION_METHODS, f"concat{MDROP_SUFFIX}",
           *(f"{m}{SINGLE_SUFFIX}" for m in MODALITIES))
#: Test conditions: name → the modalities marked absent.
CONDITIONS = {"all": (), "no_pixels": ("pixels",), "no_state": ("state",)}
#: The exact return of any policy that ignores the ball (module docstring).
BLIND_RETURN = -0.6
#: The training return ``steps_to_return`` waits for in the table (0.8: 90 % catches).
THRESHOLD = 0.8


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
    # Flat (the ledger hashes these fields); the defaults are PPOConfig's and
    # AgentConfig's, so each number is set in one place.
    total_steps: int = PPOConfig.total_steps
    num_envs: int = PPOConfig.num_envs
    rollout_steps: int = PPOConfig.rollout_steps
    update_epochs: int = PPOConfig.update_epochs
    minibatches: int = PPOConfig.minibatches
    learning_rate: float = PPOConfig.learning_rate
    gamma: float = PPOConfig.gamma
    gae_lambda: float = PPOConfig.gae_lambda
    clip_epsilon: float = PPOConfig.clip_epsilon
    entropy_coef: float = PPOConfig.entropy_coef
    value_coef: float = PPOConfig.value_coef
    max_grad_norm: float = PPOConfig.max_grad_norm
    dim: int = AgentConfig.dim
    hidden: int = AgentConfig.hidden
    cnn_widths: tuple[int, ...] = AgentConfig.cnn_widths
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
        """The actor-critic of ``method``.

        Args:
          method: a method name (``parse_method``).

        Returns:
          Its ``AgentConfig``: the method's fusion and modalities, this config's sizes.
        """
        fusion, modalities, _ = parse_method(method)
        return AgentConfig(fusion, modalities, self.dim, self.hidden, self.cnn_widths)

    def ppo(self, method: str) -> PPOConfig:
        """PPO's settings for ``method``.

        Args:
          method: a method name (``parse_method``).

        Returns:
          Its ``PPOConfig``: this config's PPO fields, with modality dropout only for a
          ``+mdrop`` method.
        """
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(PPOConfig)}
        dropout = self.modality_dropout if parse_method(method).modality_dropout else None
        return PPOConfig(**{**fields, "modality_dropout": dropout})


def quick_config(**overrides: Any) -> RLFusionConfig:
    """The ``--quick`` settings: ``concat`` and ``state_only``, one seed, 16 384 steps.

    Args:
      **overrides: config fields that replace the quick settings.

    Returns:
      The config, ``quick=True``; records under ``WORKDIR/results``, never in the
      committed ledger.
    """
    base = dict(methods=("concat", "state_only"), seeds=(0,), total_steps=16_384,
                quick=True, workdir="runs/rl_fusion_quick")
    merged = {**base, **overrides}
    merged.setdefault("results", str(Path(merged["workdir"]) / "results"))
    return RLFusionConfig(**merged)


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
    """The methods to run, validated before any computation.

    Args:
      config: the experiment's config.

    Returns:
      ``config.methods`` without repeats, or ``METHODS`` when it is empty.

    Raises:
      ValueError: an unknown method (``parse_method``).
    """
    methods = list(dict.fromkeys(config.methods)) or list(METHODS)
    for m in methods:
        parse_method(m)
    return methods


def catch_rate(episode_return: float) -> float:
    """Catch's fraction of balls caught from the mean return (+1 caught, -1 missed).

    Args:
      episode_return: a mean episode return.

    Returns:
      ``(episode_return + 1) / 2``.
    """
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
