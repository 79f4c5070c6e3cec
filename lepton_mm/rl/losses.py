"""PPO's pure pieces: GAE advantages and the clipped objective (rlax inside).

Pure functions of arrays (no Flax, no optimiser), so they jit, vmap and test alone.
Needs rlax (the ``rl`` extra), imported when they run.

References:
  Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation", ICLR 2016. https://arxiv.org/abs/1506.02438
  Schulman et al., "Proximal Policy Optimization Algorithms", 2017.
  https://arxiv.org/abs/1707.06347
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from lepton_mm.rl._extra import require

__all__ = ["LossTerms", "advantages", "ppo_loss"]


def advantages(rewards: Array, terminated: Array, values: Array, last_value: Array, *,
               gamma: float, gae_lambda: float) -> tuple[Array, Array]:
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
    rlax = require("rlax")
    discounts = gamma * (1.0 - terminated.astype(jnp.float32))
    bootstrapped = jnp.concatenate([values, last_value[None]], axis=0)
    gae = jax.vmap(rlax.truncated_generalized_advantage_estimation,
                   in_axes=(1, 1, None, 1), out_axes=1)
    adv = gae(rewards.astype(jnp.float32), discounts, gae_lambda, bootstrapped)
    return adv, adv + values


class LossTerms(NamedTuple):
    """The parts of the PPO loss.

    Attributes:
      policy: float32 scalar, the clipped surrogate loss.
      value: float32 scalar, the clipped value loss.
      entropy: float32 scalar, the mean entropy of the action distributions.
    """

    policy: Array
    value: Array
    entropy: Array


def ppo_loss(logits: Array, values: Array, actions: Array, old_log_probs: Array,
             old_values: Array, adv: Array, targets: Array, *, clip_epsilon: float,
             value_coef: float, entropy_coef: float) -> tuple[Array, LossTerms]:
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
    rlax = require("rlax")
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
