"""Environments seen through several modalities: a gymnax environment and an ``observe``
that turns one environment state into ``{modality: array}``.

``make_env("catch")`` is bsuite's Catch as gymnax implements it (``Catch-bsuite``): a
ball falls from a random column of a 10 x 5 board, the agent moves a paddle along the
bottom row (left, stay, right) and gets +1 for a catch and -1 for a miss after 9 steps.
Its two modalities come from the same state:

  pixels  gymnax's own observation, float32 ``[10, 5, 1]`` (ball and paddle cells = 1)
  state   the symbolic state, float32 ``[3]``: ball column, ball row, paddle column,
          each scaled to [0, 1]

Each alone suffices to play perfectly. A policy that ignores the ball catches it with
probability exactly 1/5 (return -0.6), whatever it does. gymnax's ``step`` resets an
environment by itself when its episode ends.

Needs gymnax (the ``rl`` extra), imported when ``make_env`` runs.

References:
  Osband et al., "Behaviour Suite for Reinforcement Learning", ICLR 2020 (Catch).
  Lange, "gymnax: A JAX-based Reinforcement Learning Environment Library", 2022.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp

from lepton_mm.rl._extra import require

__all__ = ["ENVIRONMENTS", "EnvSpec", "make_env"]

#: ``make_env`` names → the gymnax environment id.
ENVIRONMENTS = {"catch": "Catch-bsuite"}


class EnvSpec(NamedTuple):
    """An environment and how an agent sees it.

    Attributes:
      name: the ``ENVIRONMENTS`` key.
      env: the gymnax environment (``reset(key, params)``, ``step(key, state, action,
        params)``).
      params: its ``EnvParams``.
      num_actions: size of the discrete action space.
      observe: one environment's state → ``{modality: float32 array}`` (Catch:
        ``{"pixels": [10, 5, 1], "state": [3]}``).
      modalities: the keys of ``observe``'s output, sorted: the order of the
        ``missing`` flags that ``lepton_mm.rl.PPO.evaluate`` takes.
    """

    name: str
    env: Any
    params: Any
    num_actions: int
    observe: Callable[[Any], dict[str, Any]]
    modalities: tuple[str, ...]


def _catch(environment: Any) -> Callable[[Any], dict[str, Any]]:
    """Catch's ``observe``: the board image and the scaled ball and paddle positions."""
    rows, columns = environment.rows, environment.columns

    def observe(state: Any) -> dict[str, Any]:
        pixels = environment.get_obs(state).astype(jnp.float32)[:, :, None]
        vector = jnp.stack([state.ball_x / (columns - 1), state.ball_y / (rows - 1),
                            state.paddle_x / (columns - 1)]).astype(jnp.float32)
        return {"pixels": pixels, "state": vector}

    return observe


_OBSERVERS = {"catch": (_catch, ("pixels", "state"))}


def make_env(env: str) -> EnvSpec:
    """The ``EnvSpec`` of ``env`` (gymnax, imported here).

    Args:
      env: a key of ``ENVIRONMENTS``.

    Returns:
      The environment, its parameters and its ``observe``.

    Raises:
      ValueError: ``env`` is not a key of ``ENVIRONMENTS`` (the message names ``env``).
      ImportError: gymnax (the ``rl`` extra) is not installed.
    """
    if env not in ENVIRONMENTS:
        raise ValueError(f"env: unknown environment {env!r}. Known: {sorted(ENVIRONMENTS)}.")
    environment, params = require("gymnax").make(ENVIRONMENTS[env])
    observer, modalities = _OBSERVERS[env]
    return EnvSpec(env, environment, params, int(environment.num_actions),
                   observer(environment), modalities)
