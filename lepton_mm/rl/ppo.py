"""PPO with fused observations, the whole run one compiled program.

``make_ppo(spec, apply, modalities, config)`` gives ``PPO(train, evaluate)``, both
``jax.jit``-compiled:

* ``train(variables, key)``: ``config.num_updates`` rounds, one ``lax.scan``, of
  ``collect_rollout`` (``num_envs`` environments stepped together by ``jax.vmap``, the
  agent seeing every modality, or with ``modality_dropout`` a random subset per
  environment and step) then ``ppo_update`` (rlax's GAE, then ``update_epochs`` passes
  of ``minibatches`` minibatches of the clipped objective; optax clips the gradient
  norm and applies Adam at a rate decaying linearly to 0 over the run);
* ``evaluate(variables, key, missing, uniform)``: ``eval_envs`` fresh environments
  played for ``eval_steps`` steps with the modalities flagged in ``missing`` marked
  absent through the presence masks (nothing retrained).

The agent is any model, as a pure function (``lepton_mm.functional``), that maps
``{modality: [envs, ...], "present": {modality: bool [envs]}}`` to float
``[envs, num_actions + 1]``: the action logits, then the value (``make_agent``).
Every function takes its PRNG key; nothing here invents a seed. Typical use::

    spec = make_env("catch")
    agent = make_agent(spec, "concat", spec.modalities, dim=32, hidden=32,
                       rngs=nnx.Rngs(0))
    apply, variables = functional(agent)
    ppo = make_ppo(spec, apply, spec.modalities, PPOConfig(total_steps=81_920))
    variables, curve = ppo.train(variables, jax.random.key(1))
    tested = ppo.evaluate(variables, jax.random.key(2), jnp.array([True, False]), False)

Needs rlax and gymnax (the ``rl`` extra), imported when a program is traced.

References:
  Schulman et al., "Proximal Policy Optimization Algorithms", 2017.
  https://arxiv.org/abs/1707.06347
  Lu et al., "Discovered Policy Optimisation", NeurIPS 2022 (PureJaxRL: the whole PPO
  loop under one ``jax.jit``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import Array

from lepton_mm._validation import check_modalities, check_positive_int
from lepton_mm.fusion import modality_dropout as _modality_dropout
from lepton_mm.rl.envs import EnvSpec
from lepton_mm.rl.losses import LossTerms, advantages, ppo_loss
from lepton_mm.types import EncoderOutput

__all__ = ["PPO", "PPOConfig", "Transition", "VecEnvState", "collect_rollout", "make_ppo",
           "ppo_update", "reset_envs"]

#: ``policy(params, obs, present) -> (logits [envs, num_actions], values [envs])``.
Policy = Callable[[Any, Mapping[str, Array], Mapping[str, Array]], tuple[Array, Array]]


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO's settings (the usual CleanRL / PureJaxRL ones for small discrete tasks).

    Attributes:
      total_steps: environment steps of the run (all environments together).
      num_envs: environments stepped in parallel (``jax.vmap``).
      rollout_steps: steps per environment between two updates.
      update_epochs, minibatches: PPO passes over each rollout, and minibatches per pass.
      learning_rate: Adam's rate, annealed linearly to 0 over the run.
      gamma, gae_lambda: discount and GAE mixing.
      clip_epsilon: PPO's ratio clip (also clips the value update).
      entropy_coef, value_coef: weights of the entropy bonus and the value loss.
      max_grad_norm: global gradient-norm clip.
      modality_dropout: None, or the rate at which each modality is hidden per
        environment and step while training (``lepton_mm.fusion.modality_dropout``; one
        modality is always kept; the update sees the flags the policy acted on).
      eval_envs, eval_steps: ``evaluate`` runs ``eval_envs`` environments for
        ``eval_steps`` steps.
    """

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
    modality_dropout: float | None = None
    eval_envs: int = 256
    eval_steps: int = 90

    def __post_init__(self) -> None:
        for name in ("total_steps", "num_envs", "rollout_steps", "update_epochs",
                     "minibatches", "eval_envs", "eval_steps"):
            check_positive_int(name, getattr(self, name))
        batch = self.num_envs * self.rollout_steps
        if self.total_steps < batch:
            raise ValueError(f"total_steps: expected at least num_envs * rollout_steps = "
                             f"{batch}, got {self.total_steps}.")
        if batch % self.minibatches:
            raise ValueError(f"minibatches: must divide num_envs * rollout_steps = "
                             f"{batch}, got {self.minibatches}.")
        if self.modality_dropout is not None and not 0.0 < self.modality_dropout < 1.0:
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


class VecEnvState(NamedTuple):
    """Environments stepped together.

    Attributes:
      states: the gymnax states, a leading ``[envs]`` axis.
      returns: float32 ``[envs]``, each running episode's return so far.
      key: the PRNG key of the next step.
    """

    states: Any
    returns: Array
    key: Array


class Transition(NamedTuple):
    """One step of every environment (a leading ``[envs]`` axis; a rollout stacks
    ``[steps, envs]``).

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

    obs: dict[str, Array]
    present: dict[str, Array]
    action: Array
    log_prob: Array
    value: Array
    reward: Array
    terminated: Array
    done: Array
    episode_return: Array


class PPO(NamedTuple):
    """A compiled PPO run and test (``make_ppo``).

    Attributes:
      train: ``train(variables, key) -> (variables, curve)``: the whole run;
        ``curve = {"return_sum", "episodes", "loss", "entropy"}``, float32
        ``[num_updates]`` each (the summed returns and the number of the training
        episodes that ended in each update's rollout; the mean loss and entropy of its
        minibatches).
      evaluate: ``evaluate(variables, key, missing, uniform) -> {"return_sum",
        "episodes"}`` (float32 and int32 scalars): ``missing`` bool
        ``[len(spec.modalities)]`` marks absent modalities (in ``spec.modalities``
        order); ``uniform`` (bool scalar) replaces the policy by uniform actions.
    """

    train: Callable[[Any, Array], tuple[Any, dict[str, Array]]]
    evaluate: Callable[[Any, Array, Array, Array], dict[str, Array]]


def _actor_critic(apply: Callable[..., Array], variables: Any) -> Policy:
    """The policy of an agent whose last output is the value: ``(logits, values)``."""
    def policy(params: Any, obs: Mapping[str, Array],
               present: Mapping[str, Array]) -> tuple[Array, Array]:
        out = apply({**variables, "params": params}, {**obs, "present": present})
        return out[:, :-1], out[:, -1]

    return policy


def _presence(modalities: Sequence[str], order: Sequence[str], missing: Array,
              num_envs: int) -> dict[str, Array]:
    """``{m: bool [num_envs]}``: False for the modalities flagged in ``missing`` (bool
    ``[len(order)]``, in ``order``)."""
    return {m: jnp.broadcast_to(~missing[order.index(m)], (num_envs,)) for m in modalities}


def _dropped_presence(present: dict[str, Array], rate: float,
                      key: Array) -> dict[str, Array]:
    """Presence flags after ``lepton_mm.fusion.modality_dropout`` (each modality hidden
    with probability ``rate`` per environment, one always kept): it is applied to
    placeholder ``EncoderOutput``s ``[envs, 1, 1]`` and their ``present`` read back."""
    placeholders = {m: EncoderOutput.from_tokens(jnp.ones((flags.shape[0], 1, 1)),
                                                 flags[:, None])
                    for m, flags in present.items()}
    return {m: out.present for m, out in
            _modality_dropout(placeholders, rate, key=key).items()}


def reset_envs(spec: EnvSpec, key: Array, num_envs: int) -> VecEnvState:
    """``num_envs`` fresh environments.

    Args:
      spec: the environment.
      key: a PRNG key (split into the resets' keys and the first step's).
      num_envs: how many.

    Returns:
      Their ``VecEnvState``, returns zero.
    """
    reset_key, key = jax.random.split(key)
    _, states = jax.vmap(spec.env.reset, in_axes=(0, None))(
        jax.random.split(reset_key, num_envs), spec.params)
    return VecEnvState(states, jnp.zeros(num_envs, jnp.float32), key)


def _step_envs(spec: EnvSpec, policy: Policy, params: Any, envs: VecEnvState,
               present: dict[str, Array], uniform: Array | bool) -> tuple[VecEnvState,
                                                                          Transition]:
    """Every environment takes one action sampled from the policy (uniform: from
    uniform logits); an environment whose episode ends resets itself (gymnax)."""
    key, act_key, step_key = jax.random.split(envs.key, 3)
    obs = jax.vmap(spec.observe)(envs.states)
    logits, value = policy(params, obs, present)
    logits = jnp.where(uniform, jnp.zeros_like(logits), logits)
    action = jax.random.categorical(act_key, logits)
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None],
                                   axis=1)[:, 0]
    _, states, reward, terminated, truncated, _ = jax.vmap(
        spec.env.step, in_axes=(0, 0, 0, None))(
        jax.random.split(step_key, envs.returns.shape[0]), envs.states, action, spec.params)
    reward = reward.astype(jnp.float32)
    done = terminated | truncated
    running = envs.returns + reward
    finished = jnp.where(done, running, 0.0)
    running = jnp.where(done, 0.0, running)
    return VecEnvState(states, running, key), Transition(
        obs, present, action, log_prob, value, reward, terminated, done, finished)


def collect_rollout(spec: EnvSpec, policy: Policy, params: Any, envs: VecEnvState,
                    present: dict[str, Array], *, steps: int,
                    modality_dropout: float | None = None,
                    uniform: Array | bool = False) -> tuple[VecEnvState, Transition]:
    """``steps`` steps of every environment under the policy (one ``lax.scan``).

    Args:
      spec: the environment.
      policy: ``policy(params, obs, present) -> (logits [envs, num_actions], values
        [envs])``.
      params: the policy's parameters.
      envs: the environments (``reset_envs``), their key included.
      present: ``{modality: bool [envs]}``, the presence flags the policy sees.
      steps: steps per environment.
      modality_dropout: None, or a rate: each step, each modality still present is
        hidden with this probability per environment (one always kept), drawn from
        ``envs.key`` (``lepton_mm.fusion.modality_dropout``).
      uniform: bool scalar: sample uniform actions instead of the policy's.

    Returns:
      ``(envs, rollout)``: the environments after the last step and the
      ``Transition``s, ``[steps, envs]``.
    """
    def step(envs: VecEnvState, _: Any) -> tuple[VecEnvState, Transition]:
        flags = present
        if modality_dropout is not None:
            key, drop_key = jax.random.split(envs.key)
            flags = _dropped_presence(present, modality_dropout, drop_key)
            envs = envs._replace(key=key)
        return _step_envs(spec, policy, params, envs, flags, uniform)

    return jax.lax.scan(step, envs, None, length=steps)


def ppo_update(policy: Policy, tx: optax.GradientTransformation, params: Any,
               opt_state: Any, rollout: Transition, last_value: Array, key: Array,
               config: PPOConfig) -> tuple[Any, Any, dict[str, Array]]:
    """PPO's update on one rollout: GAE advantages, then ``config.update_epochs``
    passes over the rollout in ``config.minibatches`` shuffled minibatches, one
    gradient step of ``ppo_loss`` each.

    Args:
      policy: as in ``collect_rollout``.
      tx: the optimiser.
      params: the policy's parameters.
      opt_state: ``tx``'s state.
      rollout: ``Transition``s ``[steps, envs]`` (``collect_rollout``).
      last_value: float32 ``[envs]``, the value of the observation after the rollout.
      key: a PRNG key (the minibatch order of each pass).
      config: ``gamma``, ``gae_lambda``, ``update_epochs``, ``minibatches`` and the
        loss weights.

    Returns:
      ``(params, opt_state, {"loss", "entropy"})``: the means over the minibatches
      (float32 scalars).
    """
    adv, targets = advantages(rollout.reward, rollout.terminated, rollout.value,
                              last_value, gamma=config.gamma, gae_lambda=config.gae_lambda)
    size = rollout.reward.size
    flat = jax.tree.map(lambda x: x.reshape(size, *x.shape[2:]), (rollout, adv, targets))

    def loss_fn(p: Any, batch: tuple[Transition, Array, Array]) -> tuple[Array, LossTerms]:
        tr, a, g = batch
        logits, values = policy(p, tr.obs, tr.present)
        return ppo_loss(logits, values, tr.action, tr.log_prob, tr.value, a, g,
                        clip_epsilon=config.clip_epsilon, value_coef=config.value_coef,
                        entropy_coef=config.entropy_coef)

    def minibatch_step(state: tuple, batch: tuple) -> tuple[tuple, tuple[Array, Array]]:
        p, o = state
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch)
        updates, o = tx.update(grads, o, p)
        return (optax.apply_updates(p, updates), o), (loss, terms.entropy)

    def epoch(state: tuple, epoch_key: Array) -> tuple[tuple, tuple[Array, Array]]:
        order = jax.random.permutation(epoch_key, size)
        batches = jax.tree.map(
            lambda x: x[order].reshape(config.minibatches, size // config.minibatches,
                                       *x.shape[1:]), flat)
        return jax.lax.scan(minibatch_step, state, batches)

    (params, opt_state), (losses, entropies) = jax.lax.scan(
        epoch, (params, opt_state), jax.random.split(key, config.update_epochs))
    return params, opt_state, {"loss": losses.mean(), "entropy": entropies.mean()}


def _optimizer(config: PPOConfig) -> optax.GradientTransformation:
    """Gradient-norm clip, then Adam at a rate decaying linearly to 0 over the run."""
    schedule = optax.linear_schedule(
        config.learning_rate, 0.0,
        transition_steps=config.num_updates * config.update_epochs * config.minibatches)
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                       optax.adam(schedule, eps=1e-5))


def make_ppo(spec: EnvSpec, apply: Callable[..., Array], modalities: Sequence[str],
             config: PPOConfig) -> PPO:
    """The compiled PPO run and test of an agent.

    Args:
      spec: the environment (``make_env``).
      apply: the agent as a pure function, ``apply(variables, batch) -> [envs,
        num_actions + 1]`` (``lepton_mm.functional.functional(make_agent(...))[0]``).
      modalities: the modalities the agent observes, a subset of ``spec.modalities``.
      config: the settings.

    Returns:
      ``PPO(train, evaluate)``, each a ``jax.jit``-compiled function.

    Raises:
      ValueError: an unknown modality (the message names ``modalities``).
    """
    modalities = sorted(check_modalities("modalities", modalities, spec.modalities))
    n, tx = config.num_envs, _optimizer(config)

    def update(policy: Policy, carry: tuple, _: Any) -> tuple[tuple, dict[str, Array]]:
        params, opt_state, envs = carry
        present = _presence(modalities, spec.modalities,
                            jnp.zeros(len(spec.modalities), bool), n)
        envs, rollout = collect_rollout(spec, policy, params, envs, present,
                                        steps=config.rollout_steps,
                                        modality_dropout=config.modality_dropout)
        _, last_value = policy(params, jax.vmap(spec.observe)(envs.states), present)
        key, update_key = jax.random.split(envs.key)
        params, opt_state, stats = ppo_update(policy, tx, params, opt_state, rollout,
                                              last_value, update_key, config)
        return (params, opt_state, envs._replace(key=key)), {
            "return_sum": rollout.episode_return.sum(),
            "episodes": rollout.done.sum().astype(jnp.float32), **stats}

    @jax.jit
    def train(variables: Any, key: Array) -> tuple[Any, dict[str, Array]]:
        envs = reset_envs(spec, key, n)
        params, policy = variables["params"], _actor_critic(apply, variables)
        (params, *_), curve = jax.lax.scan(
            lambda carry, x: update(policy, carry, x), (params, tx.init(params), envs),
            None, length=config.num_updates)
        return {**variables, "params": params}, curve

    @jax.jit
    def evaluate(variables: Any, key: Array, missing: Array,
                 uniform: Array) -> dict[str, Array]:
        envs = reset_envs(spec, key, config.eval_envs)
        present = _presence(modalities, spec.modalities, missing, config.eval_envs)
        _, rollout = collect_rollout(spec, _actor_critic(apply, variables),
                                     variables["params"], envs, present,
                                     steps=config.eval_steps, uniform=uniform)
        return {"return_sum": rollout.episode_return.sum(), "episodes": rollout.done.sum()}

    return PPO(train, evaluate)
