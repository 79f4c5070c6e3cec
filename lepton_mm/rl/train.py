"""One agent end to end: built, trained with PPO, tested with modalities missing.

``train_and_test(env, agent, config, key=..., rngs=...)`` is what an experiment over
seeds calls once per run. It builds the agent (``make_agent``) from ``rngs`` and its
PPO program (``make_ppo``), compiled ahead of time once per ``(env, agent, config)`` in
a process and reused for every seed; trains it with one half of ``key``; and tests the
trained agent with the other half: the same fresh episodes with each condition's
modalities marked absent (the presence masks; nothing retrained), and with uniformly
random actions as a baseline. ``steps_to_return`` reads a learning curve.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

from lepton_mm._validation import check_modalities, check_positive_int
from lepton_mm.functional import functional
from lepton_mm.rl.agent import make_agent
from lepton_mm.rl.envs import EnvSpec, make_env
from lepton_mm.rl.ppo import PPO, PPOConfig, make_ppo

__all__ = ["AgentConfig", "Trial", "steps_to_return", "train_and_test"]


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """The actor-critic (``make_agent``'s arguments).

    Attributes:
      fusion: a name in ``lepton_mm.fusion.FUSIONS``, or None for one modality.
      modalities: the modalities the agent observes.
      dim: each encoder's output size.
      hidden: the fused (or single) feature size.
      cnn_widths: the pixel encoder's convolution widths.
    """

    fusion: str | None
    modalities: tuple[str, ...]
    dim: int = 32
    hidden: int = 32
    cnn_widths: tuple[int, ...] = (16, 16)

    def __post_init__(self) -> None:
        for name in ("modalities", "cnn_widths"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str)
                               else tuple(value))
        check_positive_int("dim", self.dim)
        check_positive_int("hidden", self.hidden)
        if not self.cnn_widths:
            raise ValueError("cnn_widths: expected one or more widths, got ().")
        for i, width in enumerate(self.cnn_widths):
            check_positive_int(f"cnn_widths[{i}]", width)


class Trial(NamedTuple):
    """What ``train_and_test`` returns.

    Attributes:
      variables: the trained agent's variables.
      curve: the learning curve, numpy ``[num_updates]`` each: ``env_steps`` (int, the
        environment steps after each update), ``return_sum`` and ``episodes`` (float32:
        the summed return and the number of the training episodes that ended in that
        update's rollout), ``return`` (float32, their mean; NaN where none ended),
        ``loss`` and ``entropy`` (float32, means over the update's minibatches).
      test_return: ``{condition: mean return}`` over the test episodes.
      test_episodes: ``{condition: number of test episodes}``.
      random_return: the mean return of uniformly random actions, same episodes.
      final_return: the mean return of the training episodes that ended in the last
        tenth of the updates (at least one update).
      params: the agent's number of parameters.
      compile_seconds: how long compiling the training program took (once per
        ``(env, agent, config)`` and process; later trials report the same).
      train_seconds: training, after compiling.
    """

    variables: Any
    curve: dict[str, np.ndarray]
    test_return: dict[str, float]
    test_episodes: dict[str, int]
    random_return: float
    final_return: float
    params: int
    compile_seconds: float
    train_seconds: float


@functools.cache
def _spec(env: str) -> EnvSpec:
    return make_env(env)


#: ``(env, agent, config)`` → the PPO program, its compiled ``train`` and compile seconds.
_PROGRAMS: dict[tuple[str, AgentConfig, PPOConfig], tuple[PPO, Any, float]] = {}


def _program(env: str, agent: AgentConfig, config: PPOConfig, apply: Any, variables: Any,
             key: Array) -> tuple[PPO, Any, float]:
    """The program of ``(env, agent, config)``, built and compiled on the first call
    (from its ``apply``: every agent of one ``AgentConfig`` has the same structure)."""
    cache_key = (env, agent, config)
    if cache_key not in _PROGRAMS:
        ppo = make_ppo(_spec(env), apply, agent.modalities, config)
        start = time.perf_counter()
        compiled = ppo.train.lower(variables, key).compile()
        _PROGRAMS[cache_key] = ppo, compiled, time.perf_counter() - start
    return _PROGRAMS[cache_key]


def train_and_test(env: str, agent: AgentConfig, config: PPOConfig, *, key: Array,
                   rngs: nnx.Rngs, conditions: Mapping[str, Sequence[str]]) -> Trial:
    """Builds an agent, trains it with PPO and tests it under each condition.

    Args:
      env: a key of ``lepton_mm.rl.ENVIRONMENTS``.
      agent: the actor-critic.
      config: PPO's settings.
      key: a PRNG key, split into the training key (environments, actions, modality
        dropout, minibatch order) and the test key (the test episodes: the same for
        every condition).
      rngs: the agent's parameter initialisation.
      conditions: ``{name: the modalities marked absent}``, e.g. ``{"all": (),
        "no_pixels": ("pixels",)}``.

    Returns:
      The ``Trial``.

    Raises:
      ValueError: an unknown environment, fusion or modality (the message names the
        argument).
    """
    spec = _spec(env)
    for name, missing in conditions.items():
        check_modalities(f"conditions[{name!r}]", missing, spec.modalities)
    apply, variables = functional(make_agent(
        spec, agent.fusion, agent.modalities, dim=agent.dim, hidden=agent.hidden, rngs=rngs,
        cnn_widths=agent.cnn_widths))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
    train_key, test_key = jax.random.split(key)
    ppo, compiled, compile_seconds = _program(env, agent, config, apply, variables, train_key)
    start = time.perf_counter()
    variables, curve = compiled(variables, train_key)
    curve = jax.tree.map(np.asarray, jax.block_until_ready(curve))
    train_seconds = time.perf_counter() - start

    def test(missing: Sequence[str], uniform: bool = False) -> tuple[float, int]:
        flags = jnp.array([m in missing for m in spec.modalities])
        out = ppo.evaluate(variables, test_key, flags, jnp.asarray(uniform))
        episodes = int(out["episodes"])
        return float(out["return_sum"]) / max(episodes, 1), episodes

    tested = {name: test(missing) for name, missing in conditions.items()}
    episodes, tail = curve["episodes"], max(1, config.num_updates // 10)
    final = float(curve["return_sum"][-tail:].sum() / max(episodes[-tail:].sum(), 1))
    curve["return"] = np.where(episodes > 0, curve["return_sum"] / np.maximum(episodes, 1),
                               np.nan)
    curve["env_steps"] = (config.num_envs * config.rollout_steps
                          * np.arange(1, config.num_updates + 1))
    return Trial(variables, curve, {k: v[0] for k, v in tested.items()},
                 {k: v[1] for k, v in tested.items()}, test((), uniform=True)[0], final,
                 count, compile_seconds, train_seconds)


def steps_to_return(curve: Mapping[str, Sequence[Any]], threshold: float, *,
                    window: int = 5) -> int | None:
    """The first environment step at which the training return's moving average (over
    ``window`` updates) reaches ``threshold``; None if it never does.

    Args:
      curve: ``env_steps`` and ``return`` sequences, one entry per update (a
        ``Trial.curve``, or a record's lists; a None or NaN return is an update in
        which no episode ended, left out of the average).
      threshold: the return to reach.
      window: updates averaged.

    Returns:
      The environment steps, or None.
    """
    returns = np.array([np.nan if r is None else r for r in curve["return"]], float)
    for i in range(window - 1, len(returns)):
        recent = returns[i - window + 1:i + 1]
        if not np.isnan(recent).all() and np.nanmean(recent) >= threshold:
            return int(curve["env_steps"][i])
    return None
