"""Fusion inside a PPO agent: Catch (gymnax) seen as pixels and as a state vector.

The environment is bsuite's Catch as gymnax implements it (``Catch-bsuite``): a ball
falls from a random column of a 10 x 5 board, the agent moves a paddle along the bottom
row (left, stay, right) and gets +1 for a catch and -1 for a miss after 9 steps. The
agent observes it through two modalities made from the same gymnax state:

  pixels  gymnax's own observation, float32 ``[10, 5, 1]`` (ball and paddle cells = 1)
          -> ``lepton_mm.encoders.ImageCNN`` -> its feature map flattened through a
          linear layer (``PixelEncoder``)
  state   the symbolic state, float32 ``[3]``: ball column, ball row, paddle column,
          each scaled to [0, 1] -> a two-layer MLP (``StateEncoder``)

Each modality alone suffices to play perfectly, so the experiment asks how fast each
observation path learns, what a fusion layer costs or gains over the better single
modality, and what an agent trained on both does when one is missing at test time
(``batch["present"]``, the library's presence masks). A policy that ignores the ball
catches it with probability exactly 1/5 (return -0.6), whatever it does.

Methods: a fusion name in ``lepton_mm.fusion.FUSIONS`` (both modalities; the table uses
``concat``, ``gated`` and ``attention``), ``pixels_only`` / ``state_only``, or a fusion
name with ``+mdrop``, trained with modality dropout (``lepton_mm.fusion.modality_dropout``
draws the presence flags of every environment at every step; the PPO update sees the
flags the policy acted on). The agent is a ``MultimodalClassifier`` whose head outputs
three action logits and a value; PPO (Schulman et al. 2017) trains it on 16 environments
stepped together (``jax.vmap``), the whole rollout + update loop one ``jax.jit``-compiled
``lax.scan``. Advantages are rlax's truncated GAE, the policy loss rlax's clipped
surrogate and the entropy bonus rlax's; optax clips the gradient norm and applies Adam.

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
import functools
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lepton_mm import harness
from lepton_mm.encoders import ImageCNN
from lepton_mm.experiment import RunKey, format_mean_std, seed_stats
from lepton_mm.functional import functional
from lepton_mm.fusion import FUSIONS, build, modality_dropout
from lepton_mm.models import MultimodalClassifier
from lepton_mm.types import EncoderOutput

#: ``--env`` names → the gymnax environment id.
ENVIRONMENTS = {"catch": "Catch-bsuite"}
#: The modalities every environment here offers.
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
      env: a key of ``ENVIRONMENTS``.
      total_steps: environment steps per run (all environments together).
      num_envs: environments stepped in parallel (``jax.vmap``).
      rollout_steps: steps per environment between two updates.
      update_epochs, minibatches: PPO passes over each rollout, and minibatches per pass.
      learning_rate: Adam's rate, annealed linearly to 0 over the run.
      gamma, gae_lambda: discount and GAE mixing.
      clip_epsilon: PPO's ratio clip (also clips the value update).
      entropy_coef, value_coef: weights of the entropy bonus and the value loss.
      max_grad_norm: global gradient-norm clip.
      dim: each encoder's output size; hidden: the fused (or single) feature size.
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
        check_env(self.env)
        for name in ("total_steps", "num_envs", "rollout_steps", "update_epochs",
                     "minibatches", "dim", "hidden", "eval_envs", "eval_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}.")
        if not self.cnn_widths or not all(
                isinstance(w, int) and not isinstance(w, bool) and w > 0
                for w in self.cnn_widths):
            raise ValueError(f"cnn_widths: expected positive ints, got {self.cnn_widths!r}.")
        if self.total_steps < self.num_envs * self.rollout_steps:
            raise ValueError(f"total_steps: expected at least num_envs * rollout_steps = "
                             f"{self.num_envs * self.rollout_steps}, got {self.total_steps}.")
        if (self.num_envs * self.rollout_steps) % self.minibatches:
            raise ValueError(f"minibatches: must divide num_envs * rollout_steps = "
                             f"{self.num_envs * self.rollout_steps}, got {self.minibatches}.")
        if not 0.0 < self.modality_dropout < 1.0:
            raise ValueError(f"modality_dropout: expected a rate in (0, 1), got "
                             f"{self.modality_dropout!r}.")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: expected a number in [0, 1], got "
                                 f"{getattr(self, name)!r}.")

    @property
    def num_updates(self) -> int:
        """Rollout + update rounds: ``total_steps // (num_envs * rollout_steps)``."""
        return self.total_steps // (self.num_envs * self.rollout_steps)


def quick_config(**overrides: Any) -> RLFusionConfig:
    """``--quick``: ``concat`` and ``state_only``, one seed, 16 384 steps; records under
    ``WORKDIR/results``, never in the committed ledger."""
    base = dict(methods=("concat", "state_only"), seeds=(0,), total_steps=16_384,
                quick=True, workdir="runs/rl_fusion_quick")
    merged = {**base, **overrides}
    merged.setdefault("results", str(Path(merged["workdir"]) / "results"))
    return RLFusionConfig(**merged)


# ------------------------------------------------------------------------ arguments


def check_env(env: str) -> str:
    """``env`` if it is a key of ``ENVIRONMENTS``, else a ``ValueError`` naming it."""
    if env not in ENVIRONMENTS:
        raise ValueError(f"env: unknown environment {env!r}. Known: {sorted(ENVIRONMENTS)}.")
    return env


def check_modalities(name: str, modalities: Sequence[str], *,
                     allow_empty: bool = False) -> tuple[str, ...]:
    """``modalities`` sorted, or a ``ValueError`` naming the argument ``name``."""
    if isinstance(modalities, str):
        raise TypeError(f"{name}: expected a sequence of modality names, got the string "
                        f"{modalities!r} (write ({modalities!r},)).")
    out = tuple(sorted(dict.fromkeys(modalities)))
    for m in out:
        if m not in MODALITIES:
            raise ValueError(f"{name}: unknown modality {m!r}. Known: {list(MODALITIES)}.")
    if not out and not allow_empty:
        raise ValueError(f"{name}: expected at least one of {list(MODALITIES)}.")
    return out


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


# ---------------------------------------------------------------------- environment


class EnvSpec(NamedTuple):
    """An environment and how the agent sees it.

    Attributes:
      name: the ``ENVIRONMENTS`` key.
      env: the gymnax environment (``reset(key, params)``, ``step(key, state, action,
        params)``).
      params: its ``EnvParams``.
      num_actions: size of the discrete action space.
      observe: one environment's state → ``{"pixels": float32 [10, 5, 1], "state":
        float32 [3]}``.
    """

    name: str
    env: Any
    params: Any
    num_actions: int
    observe: Callable[[Any], dict[str, Any]]


def make_env(env: str) -> EnvSpec:
    """The ``EnvSpec`` of ``env`` (gymnax, imported here).

    Raises:
      ValueError: ``env`` is not a key of ``ENVIRONMENTS`` (the message names ``env``).
    """
    import gymnax

    environment, params = gymnax.make(ENVIRONMENTS[check_env(env)])
    rows, columns = environment.rows, environment.columns

    def observe(state: Any) -> dict[str, Any]:
        pixels = environment.get_obs(state).astype(jnp.float32)[:, :, None]
        vector = jnp.stack([state.ball_x / (columns - 1), state.ball_y / (rows - 1),
                            state.paddle_x / (columns - 1)]).astype(jnp.float32)
        return {"pixels": pixels, "state": vector}

    return EnvSpec(env, environment, params, int(environment.num_actions), observe)


# ---------------------------------------------------------------------------- agent


class PixelEncoder(nnx.Module):
    """``ImageCNN`` (no pooling, no batch norm) whose feature map is flattened through a
    linear layer and a ReLU into one token, as in DQN's torso: unlike a mean over the
    map's cells it keeps where things are.

    Shapes: images float ``[batch, height, width, channels]`` → ``EncoderOutput`` with
    tokens ``[batch, 1, dim]``, an all-True mask ``[batch, 1]`` and pooled ``[batch, dim]``.

    Args:
      height, width, channels: the image size.
      dim: the output size.
      rngs: parameter initialisation.
      widths: the convolutions' widths (3 x 3, "same" padding).
    """

    def __init__(self, height: int, width: int, channels: int, *, dim: int,
                 rngs: nnx.Rngs, widths: Sequence[int] = (16, 16)):
        self.dim = dim
        self.cnn = ImageCNN(channels, dim=widths[-1], widths=widths, pool=1,
                            batch_norm=False, rngs=rngs)
        h, w = self.cnn.output_size(height, width)
        self.proj = nnx.Linear(h * w * widths[-1], dim, rngs=rngs)

    def __call__(self, images: jax.Array) -> EncoderOutput:
        tokens = self.cnn(images).tokens
        z = jax.nn.relu(self.proj(tokens.reshape(tokens.shape[0], -1)))
        return EncoderOutput.from_tokens(z[:, None, :])


class StateEncoder(nnx.Module):
    """A two-layer MLP (ReLU after both layers) for a state vector.

    Shapes: float ``[batch, features]`` → ``EncoderOutput`` with tokens ``[batch, 1,
    dim]``, an all-True mask ``[batch, 1]`` and pooled ``[batch, dim]``.

    Args:
      features: the vector's size.
      dim: the output size.
      rngs: parameter initialisation.
      hidden: the hidden layer's size.
    """

    def __init__(self, features: int, *, dim: int, rngs: nnx.Rngs, hidden: int = 64):
        self.dim = dim
        self.hidden = nnx.Linear(features, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> EncoderOutput:
        z = jax.nn.relu(self.out(jax.nn.relu(self.hidden(x))))
        return EncoderOutput.from_tokens(z[:, None, :])


def make_agent(spec: EnvSpec, fusion: str | None, modalities: Sequence[str], *, dim: int,
               hidden: int, rngs: Any, cnn_widths: Sequence[int] = (16, 16)) -> Any:
    """The actor-critic: encoders → fusion → ReLU → Linear(hidden, num_actions + 1).

    A ``lepton_mm.models.MultimodalClassifier`` whose head's outputs are the action
    logits and the state value. With two modalities the fusion layer maps to
    ``hidden``; with one, ``fusion=None`` and a Linear(dim, hidden) stands in for it.

    Args:
      spec: the environment.
      fusion: a name in ``lepton_mm.fusion.FUSIONS``, or None for one modality.
      modalities: a subset of ``MODALITIES``.
      dim: each encoder's output size.
      hidden: the fused feature size.
      rngs: parameter initialisation (``nnx.Rngs``).
      cnn_widths: the pixel encoder's convolution widths.

    Returns:
      The model: ``model({"pixels": [b, 10, 5, 1], "state": [b, 3], "present": {...}})``
      → float ``[b, num_actions + 1]``.

    Raises:
      ValueError: an unknown fusion (naming ``fusion``) or modality (naming
        ``modalities``), or a fusion for one modality / none for two.
    """
    modalities = check_modalities("modalities", modalities)
    if fusion is not None and fusion not in FUSIONS:
        raise ValueError(f"fusion: unknown fusion {fusion!r}. Known: {sorted(FUSIONS)}.")
    if (fusion is None) != (len(modalities) == 1):
        raise ValueError(f"fusion: {fusion!r} with modalities {list(modalities)}; give a "
                         "fusion for two modalities and None for one.")
    observation = jax.eval_shape(spec.observe, spec.env.reset(jax.random.key(0),
                                                              spec.params)[1])
    shapes = {m: observation[m].shape for m in modalities}
    encoders = {}
    if "pixels" in shapes:
        encoders["pixels"] = PixelEncoder(*shapes["pixels"], dim=dim, rngs=rngs,
                                       widths=cnn_widths)
    if "state" in shapes:
        encoders["state"] = StateEncoder(shapes["state"][0], dim=dim, rngs=rngs)
    out = nnx.Linear(hidden, spec.num_actions + 1, rngs=rngs)
    if fusion is None:
        head = nnx.Sequential(nnx.Linear(dim, hidden, rngs=rngs), jax.nn.relu, out)
        return MultimodalClassifier(encoders, None, head)
    layer = build(fusion, {m: dim for m in encoders}, hidden, rngs=rngs)
    return MultimodalClassifier(encoders, layer, nnx.Sequential(jax.nn.relu, out))


# ------------------------------------------------------------------------ PPO pieces


class Transition(NamedTuple):
    """One rollout step of every environment (a leading ``[num_envs]`` axis; a rollout
    stacks ``[rollout_steps, num_envs]``).

    Attributes:
      obs: ``{modality: observation}`` the action was chosen from.
      present: ``{modality: bool}``, the presence flags the policy saw.
      action: int32 action.
      log_prob: float32 log-probability of ``action`` under the acting policy.
      value: float32 value estimate.
      reward: float32 reward received after the action.
      terminated: bool, the episode ended with this step (no bootstrap past it).
      done: bool, the episode ended or was cut off (time limit) with this step.
      episode_return: float32 the finished episode's return where ``done``, else 0.
    """

    obs: dict[str, Any]
    present: dict[str, Any]
    action: Any
    log_prob: Any
    value: Any
    reward: Any
    terminated: Any
    done: Any
    episode_return: Any


def advantages(rewards: Any, terminated: Any, values: Any, last_value: Any, *,
               gamma: float, gae_lambda: float) -> tuple[Any, Any]:
    """GAE advantages and value targets of a rollout (``rlax``, vmapped over envs).

    Args:
      rewards: float32 ``[time, envs]``, the reward after each step's action.
      terminated: bool ``[time, envs]``, True where the step ended an episode.
      values: float32 ``[time, envs]``, the value estimate of each step's observation.
      last_value: float32 ``[envs]``, the value of the observation after the rollout.
      gamma: the discount.
      gae_lambda: GAE's lambda.

    Returns:
      ``(advantages, targets)``, float32 ``[time, envs]`` each; ``targets = advantages
      + values`` (the TD(lambda) returns the value head regresses on).
    """
    import rlax

    discounts = gamma * (1.0 - terminated.astype(jnp.float32))
    bootstrapped = jnp.concatenate([values, last_value[None]], axis=0)
    gae = jax.vmap(rlax.truncated_generalized_advantage_estimation,
                   in_axes=(1, 1, None, 1), out_axes=1)
    adv = gae(rewards.astype(jnp.float32), discounts, gae_lambda, bootstrapped)
    return adv, adv + values


class LossTerms(NamedTuple):
    """The parts of the PPO loss (scalars)."""
    policy: Any
    value: Any
    entropy: Any


def ppo_loss(logits: Any, values: Any, actions: Any, old_log_probs: Any, old_values: Any,
             adv: Any, targets: Any, *, clip_epsilon: float, value_coef: float,
             entropy_coef: float) -> tuple[Any, LossTerms]:
    """PPO's clipped objective on one minibatch, from the network's outputs.

    ``loss = policy + value_coef * value - entropy_coef * entropy`` with the policy term
    rlax's clipped surrogate on per-minibatch normalised advantages, the value term
    ``0.5 * mean(max((v - G)^2, (v_clip - G)^2))`` where ``v_clip = v_old + clip(v -
    v_old, -eps, eps)`` (the PPO2 / CleanRL value clip), and the mean entropy of the
    action distributions (rlax's ``entropy_loss`` is its negative).

    Args:
      logits: float32 ``[batch, num_actions]`` of the current policy.
      values: float32 ``[batch]`` current value estimates.
      actions: int32 ``[batch]`` the actions taken.
      old_log_probs: float32 ``[batch]`` their log-probabilities under the acting policy.
      old_values: float32 ``[batch]`` the acting value estimates.
      adv: float32 ``[batch]`` GAE advantages.
      targets: float32 ``[batch]`` value targets.
      clip_epsilon: the ratio clip.
      value_coef: weight of the value term.
      entropy_coef: weight of the entropy bonus.

    Returns:
      ``(loss, LossTerms(policy, value, entropy))``, float32 scalars.
    """
    import rlax

    log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits), actions[:, None],
                                    axis=1)[:, 0]
    ratios = jnp.exp(log_probs - old_log_probs)
    normalised = (adv - adv.mean()) / (adv.std() + 1e-8)
    policy = rlax.clipped_surrogate_pg_loss(ratios, normalised, clip_epsilon)
    clipped = old_values + jnp.clip(values - old_values, -clip_epsilon, clip_epsilon)
    value = 0.5 * jnp.mean(jnp.maximum((values - targets) ** 2, (clipped - targets) ** 2))
    entropy = -rlax.entropy_loss(logits, jnp.ones_like(values))
    loss = policy + value_coef * value - entropy_coef * entropy
    return loss, LossTerms(policy, value, entropy)


# ------------------------------------------------------------------------- training


def _presence(modalities: Sequence[str], missing: Any, num_envs: int) -> dict[str, Any]:
    """``{m: bool [num_envs]}``: False for the modalities flagged in ``missing`` (bool
    ``[len(MODALITIES)]``, in ``MODALITIES`` order)."""
    return {m: jnp.broadcast_to(~missing[MODALITIES.index(m)], (num_envs,))
            for m in modalities}


def _dropped_presence(present: dict[str, Any], rate: float, key: Any) -> dict[str, Any]:
    """Presence flags after ``lepton_mm.fusion.modality_dropout`` (each modality hidden
    with probability ``rate`` per environment, one always kept): it is applied to
    placeholder ``EncoderOutput``s ``[envs, 1, 1]`` and their ``present`` read back."""
    placeholders = {m: EncoderOutput.from_tokens(jnp.ones((flags.shape[0], 1, 1)),
                                                 flags[:, None])
                    for m, flags in present.items()}
    return {m: out.present for m, out in
            modality_dropout(placeholders, rate, key=key).items()}


class Program(NamedTuple):
    """One method's compiled pieces (``build_program``).

    Attributes:
      variables: the freshly initialised variables of seed 0 (shapes for ``init``).
      init: ``init(seed) -> variables`` (initialisation from the seed).
      train: ``train(variables, key) -> (variables, curve)`` the compiled PPO run;
        ``curve = {"return_sum", "episodes", "loss", "entropy"}``, float32
        ``[num_updates]`` each.
      evaluate: ``evaluate(variables, key, missing, uniform) -> {"return_sum",
        "episodes"}`` the compiled test: ``missing`` bool ``[len(MODALITIES)]`` marks
        absent modalities; ``uniform`` (bool scalar) replaces the policy by uniform
        actions.
      params: the number of parameters.
    """

    variables: Any
    init: Callable[[int], Any]
    train: Callable[..., Any]
    evaluate: Callable[..., Any]
    params: int


def build_program(config: RLFusionConfig, method: str) -> Program:
    """Builds (and caches per config and method) the jitted PPO run and test of
    ``method``.

    Args:
      config: the experiment config.
      method: a method name (``parse_method``).

    Returns:
      The ``Program``.
    """
    return _build_program(_program_key(config), method)


def _program_key(config: RLFusionConfig) -> RLFusionConfig:
    """``config`` without the fields no compiled program depends on (a cache key)."""
    return dataclasses.replace(config, methods=(), seeds=(0,), workdir="", results="",
                               progress=None, quick=False)


@functools.cache
def _build_program(config: RLFusionConfig, method: str) -> Program:
    fusion, modalities, mdrop = parse_method(method)
    spec = make_env(config.env)

    def make(seed: int) -> tuple[Any, Any]:
        model = make_agent(spec, fusion, modalities, dim=config.dim, hidden=config.hidden,
                           rngs=nnx.Rngs(seed), cnn_widths=config.cnn_widths)
        return functional(model)

    apply, variables = make(0)
    num_updates, n, t = config.num_updates, config.num_envs, config.rollout_steps
    minibatch = n * t // config.minibatches
    schedule = optax.linear_schedule(
        config.learning_rate, 0.0,
        transition_steps=num_updates * config.update_epochs * config.minibatches)
    tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                     optax.adam(schedule, eps=1e-5))

    def policy(params: Any, obs: dict[str, Any], present: dict[str, Any]) -> tuple[Any, Any]:
        out = apply({**variables, "params": params}, {**obs, "present": present})
        return out[:, :-1], out[:, -1]

    def env_step(carry: tuple, present: dict[str, Any], params: Any,
                 uniform: Any = False) -> tuple[tuple, Transition]:
        env_state, running, key = carry  # running: float32 [envs], returns so far
        key, act_key, step_key = jax.random.split(key, 3)
        obs = jax.vmap(spec.observe)(env_state)
        logits, value = policy(params, obs, present)
        logits = jnp.where(uniform, jnp.zeros_like(logits), logits)
        action = jax.random.categorical(act_key, logits)
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None],
                                       axis=1)[:, 0]
        _, env_state, reward, terminated, truncated, _ = jax.vmap(
            spec.env.step, in_axes=(0, 0, 0, None))(
            jax.random.split(step_key, running.shape[0]), env_state, action, spec.params)
        reward = reward.astype(jnp.float32)
        done = terminated | truncated
        running = running + reward
        finished = jnp.where(done, running, 0.0)
        running = jnp.where(done, 0.0, running)
        return (env_state, running, key), Transition(
            obs, present, action, log_prob, value, reward, terminated, done, finished)

    def rollout_step(carry: tuple, params: Any) -> tuple[tuple, Transition]:
        present = _presence(modalities, jnp.zeros(len(MODALITIES), bool), n)
        if mdrop:
            env_state, running, key = carry
            key, drop_key = jax.random.split(key)
            present = _dropped_presence(present, config.modality_dropout, drop_key)
            carry = env_state, running, key
        return env_step(carry, present, params)

    def update(carry: tuple, _: Any) -> tuple[tuple, dict[str, Any]]:
        params, opt_state, env_state, running, key = carry
        (env_state, running, key), rollout = jax.lax.scan(
            lambda c, _: rollout_step(c, params), (env_state, running, key), None,
            length=t)
        present = _presence(modalities, jnp.zeros(len(MODALITIES), bool), n)
        _, last_value = policy(params, jax.vmap(spec.observe)(env_state), present)
        adv, targets = advantages(rollout.reward, rollout.terminated, rollout.value,
                                  last_value, gamma=config.gamma,
                                  gae_lambda=config.gae_lambda)
        flat = jax.tree.map(lambda x: x.reshape(n * t, *x.shape[2:]),
                            (rollout, adv, targets))

        def loss_fn(p: Any, batch: tuple) -> tuple[Any, LossTerms]:
            tr, a, g = batch
            logits, values = policy(p, tr.obs, tr.present)
            return ppo_loss(logits, values, tr.action, tr.log_prob, tr.value, a, g,
                            clip_epsilon=config.clip_epsilon,
                            value_coef=config.value_coef,
                            entropy_coef=config.entropy_coef)

        def minibatch_step(state: tuple, batch: tuple) -> tuple[tuple, Any]:
            p, o = state
            (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch)
            updates, o = tx.update(grads, o, p)
            return (optax.apply_updates(p, updates), o), (loss, terms.entropy)

        def epoch(state: tuple, epoch_key: Any) -> tuple[tuple, Any]:
            order = jax.random.permutation(epoch_key, n * t)
            batches = jax.tree.map(
                lambda x: x[order].reshape(config.minibatches, minibatch, *x.shape[1:]),
                flat)
            return jax.lax.scan(minibatch_step, state, batches)

        key, epochs_key = jax.random.split(key)
        (params, opt_state), (losses, entropies) = jax.lax.scan(
            epoch, (params, opt_state), jax.random.split(epochs_key, config.update_epochs))
        metrics = {"return_sum": rollout.episode_return.sum(),
                   "episodes": rollout.done.sum().astype(jnp.float32),
                   "loss": losses.mean(), "entropy": entropies.mean()}
        return (params, opt_state, env_state, running, key), metrics

    @jax.jit
    def train(variables: Any, key: Any) -> tuple[Any, dict[str, Any]]:
        reset_key, key = jax.random.split(key)
        _, env_state = jax.vmap(spec.env.reset, in_axes=(0, None))(
            jax.random.split(reset_key, n), spec.params)
        params = variables["params"]
        carry = (params, tx.init(params), env_state, jnp.zeros(n, jnp.float32), key)
        (params, *_), curve = jax.lax.scan(update, carry, None, length=num_updates)
        return {**variables, "params": params}, curve

    @jax.jit
    def evaluate(variables: Any, key: Any, missing: Any, uniform: Any) -> dict[str, Any]:
        m = config.eval_envs
        reset_key, key = jax.random.split(key)
        _, env_state = jax.vmap(spec.env.reset, in_axes=(0, None))(
            jax.random.split(reset_key, m), spec.params)
        present = _presence(modalities, missing, m)

        def step(carry: tuple, _: Any) -> tuple[tuple, Any]:
            carry, tr = env_step(carry, present, variables["params"], uniform)
            return carry, (tr.episode_return.sum(), tr.done.sum())

        _, (returns, episodes) = jax.lax.scan(
            step, (env_state, jnp.zeros(m, jnp.float32), key), None,
            length=config.eval_steps)
        return {"return_sum": returns.sum(), "episodes": episodes.sum()}

    def init(seed: int) -> Any:
        return variables if seed == 0 else make(seed)[1]

    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
    return Program(variables, init, train, evaluate, count)


@functools.cache
def _compiled_train(config: RLFusionConfig, method: str) -> tuple[Any, float]:
    """The ahead-of-time compiled ``train`` of ``build_program`` and its compile time."""
    program = build_program(config, method)
    start = time.perf_counter()
    compiled = program.train.lower(program.variables, jax.random.key(0)).compile()
    return compiled, time.perf_counter() - start


def catch_rate(episode_return: float) -> float:
    """Catch's fraction of balls caught from the mean return (+1 caught, -1 missed)."""
    return (episode_return + 1.0) / 2.0


def train_and_test(config: RLFusionConfig, method: str, seed: int) -> dict[str, Any]:
    """Trains ``method`` with ``seed`` and tests it with each modality present and absent.

    Keys: ``jax.random.key(seed)`` split into the training key (environments, actions,
    minibatch order) and the test key; parameters from ``nnx.Rngs(seed)``. Every test
    condition (and the uniform-policy baseline) runs the same test episodes.

    Args:
      config: the experiment config (its ``methods`` and ``seeds`` are not read).
      method: a method name (``parse_method``).
      seed: the run's seed.

    Returns:
      ``{"curve": {"env_steps", "return", "episodes", "loss", "entropy"}`` (one entry
      per update; ``return`` is the mean return of the training episodes that ended in
      that update's rollout, None when none did), ``"test_return"`` and
      ``"test_episodes"`` (``{condition: value}`` for ``CONDITIONS``),
      ``"random_return"`` (uniform actions), ``"final_return"`` (the training episodes
      of the last tenth of the updates), ``"variables"`` (the trained variables),
      ``"params"``, ``"compile_seconds"``, ``"train_seconds"``}``.
    """
    program = build_program(config, method)
    compiled, compile_seconds = _compiled_train(_program_key(config), method)
    train_key, test_key = jax.random.split(jax.random.key(seed))
    start = time.perf_counter()
    variables, curve = compiled(program.init(seed), train_key)
    curve = jax.tree.map(np.asarray, jax.block_until_ready(curve))
    train_seconds = time.perf_counter() - start

    def test(missing: Sequence[str], uniform: bool = False) -> tuple[float, int]:
        flags = jnp.array([m in missing for m in MODALITIES])
        out = program.evaluate(variables, test_key, flags, jnp.asarray(uniform))
        episodes = int(out["episodes"])
        return float(out["return_sum"]) / max(episodes, 1), episodes

    tested = {name: test(missing) for name, missing in CONDITIONS.items()}
    tail = max(1, config.num_updates // 10)
    steps = config.num_envs * config.rollout_steps * np.arange(1, config.num_updates + 1)
    return {
        "curve": {
            "env_steps": steps.tolist(),
            "return": [round(float(s / e), 4) if e else None
                       for s, e in zip(curve["return_sum"], curve["episodes"], strict=True)],
            "episodes": curve["episodes"].astype(int).tolist(),
            "loss": np.round(curve["loss"], 5).tolist(),
            "entropy": np.round(curve["entropy"], 5).tolist()},
        "test_return": {k: round(v[0], 4) for k, v in tested.items()},
        "test_episodes": {k: v[1] for k, v in tested.items()},
        "random_return": round(test((), uniform=True)[0], 4),
        "final_return": round(float(curve["return_sum"][-tail:].sum()
                                    / max(curve["episodes"][-tail:].sum(), 1)), 4),
        "variables": variables,
        "params": program.params,
        "compile_seconds": round(compile_seconds, 2),
        "train_seconds": round(train_seconds, 2),
    }


def steps_to_return(curve: Mapping[str, Sequence[Any]], threshold: float, *,
                    window: int = 5) -> int | None:
    """The first environment step at which the training return's moving average (over
    ``window`` updates) reaches ``threshold``; None if it never does.

    Args:
      curve: a record's ``curve`` (``env_steps`` and ``return`` lists).
      threshold: the return to reach.
      window: updates averaged.

    Returns:
      The environment steps, or None.
    """
    returns = np.array([np.nan if r is None else r for r in curve["return"]], float)
    for i in range(window - 1, len(returns)):
        if np.nanmean(returns[i - window + 1:i + 1]) >= threshold:
            return int(curve["env_steps"][i])
    return None


# --------------------------------------------------------------------------- ledger


#: The training return ``steps_to_return`` waits for in the table (0.8: 90 % catches).
THRESHOLD = 0.8


class RLFusion(harness.Experiment):
    """One run per (method, seed): a PPO agent trained from scratch and tested with
    every modality present and with each one absent."""

    name, script = "rl_fusion", "experiments/rl_fusion.py"
    figures = ("curves.png",)
    flags = (("env", "--env"), ("total_steps", "--total-steps"),
             ("num_envs", "--num-envs"), ("rollout_steps", "--rollout-steps"),
             ("update_epochs", "--update-epochs"), ("minibatches", "--minibatches"),
             ("learning_rate", "--learning-rate"), ("gamma", "--gamma"),
             ("gae_lambda", "--gae-lambda"), ("clip_epsilon", "--clip-epsilon"),
             ("entropy_coef", "--entropy-coef"), ("value_coef", "--value-coef"),
             ("max_grad_norm", "--max-grad-norm"), ("dim", "--dim"),
             ("hidden", "--hidden"), ("cnn_widths", "--cnn-widths"),
             ("modality_dropout", "--modality-dropout"),
             ("eval_envs", "--eval-envs"),
             ("eval_steps", "--eval-steps"))

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
        """Trains and tests one run (a minute or two; nothing to resume)."""
        out = train_and_test(self.config, key.method, key.seed)
        metrics = {
            "test_accuracy": catch_rate(out["test_return"]["all"]),
            "val_accuracy": catch_rate(out["final_return"]),
            **{k: out[k] for k in ("test_return", "test_episodes", "random_return",
                                   "final_return", "curve")},
            "steps_to_return_0.8": steps_to_return(out["curve"], THRESHOLD)}
        return {"metrics": metrics, "params": out["params"],
                "seconds_per_epoch": round(out["train_seconds"] / self.config.num_updates, 4),
                "extra": {"compile_seconds": out["compile_seconds"],
                          "train_seconds": out["train_seconds"]}}

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
            per_seed = {str(r["seed"]): r["metrics"] for r in rs}
            curves = np.array([[np.nan if v is None else v for v in m["curve"]["return"]]
                               for m in per_seed.values()], float)
            reached = {s: m["steps_to_return_0.8"] for s, m in per_seed.items()}
            out[method] = {
                "seeds": [r["seed"] for r in rs],
                "modalities": list(parse_method(method).modalities),
                "test_return": {c: seed_stats({s: m["test_return"][c]
                                               for s, m in per_seed.items()})
                                for c in CONDITIONS},
                "random_return": seed_stats({s: m["random_return"]
                                             for s, m in per_seed.items()}),
                "final_return": seed_stats({s: m["final_return"] for s, m in per_seed.items()}),
                "steps_to_return_0.8": {
                    "per_seed": reached,
                    "stats": (seed_stats(reached) if all(v is not None for v in
                                                         reached.values()) else None)},
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
