"""Reinforcement learning with fused observations: PPO agents that see an environment
through several modalities.

A fusion layer is an ordinary NNX module, so it sits inside an agent as it sits inside a
classifier, and the library's presence masks test the agent with a modality missing:

  - ``envs``: ``make_env`` wraps a gymnax environment with an ``observe`` that turns its
    state into ``{modality: array}`` (``EnvSpec``); Catch as pixels and a state vector.
  - ``agent``: ``make_agent``, an actor-critic ``MultimodalClassifier`` (``PixelEncoder``
    / ``StateEncoder`` → a fusion layer by name → action logits and a value).
  - ``losses``: ``advantages`` (GAE) and ``ppo_loss`` (clipped surrogate, clipped value,
    entropy), pure functions over rlax.
  - ``ppo``: ``make_ppo`` compiles the whole run (``collect_rollout`` +
    ``ppo_update`` under one ``lax.scan``) and a test with modalities marked absent.
  - ``train``: ``train_and_test``, one agent end to end from its keys (compiled once per
    setting and reused across seeds), and ``steps_to_return`` on its learning curve.

``experiments/rl_fusion.py`` is the experiment built on it (every fusion against each
modality alone, on Catch) and ``notebooks/05_rl_fusion.ipynb`` its walk-through.

Needs the ``rl`` extra (gymnax, rlax): ``pip install 'lepton_mm[rl]'``. Importing this
package imports neither; the functions that need one import it when they run, and a
missing one is an ``ImportError`` that names the extra.
"""

from lepton_mm.rl.agent import PixelEncoder, StateEncoder, make_agent
from lepton_mm.rl.envs import ENVIRONMENTS, EnvSpec, make_env
from lepton_mm.rl.losses import LossTerms, advantages, ppo_loss
from lepton_mm.rl.ppo import (
    PPO,
    PPOConfig,
    Transition,
    VecEnvState,
    collect_rollout,
    make_ppo,
    ppo_update,
    reset_envs,
)
from lepton_mm.rl.train import AgentConfig, Trial, steps_to_return, train_and_test

__all__ = [
    "ENVIRONMENTS",
    "PPO",
    "AgentConfig",
    "EnvSpec",
    "LossTerms",
    "PPOConfig",
    "PixelEncoder",
    "StateEncoder",
    "Transition",
    "Trial",
    "VecEnvState",
    "advantages",
    "collect_rollout",
    "make_agent",
    "make_env",
    "make_ppo",
    "ppo_loss",
    "ppo_update",
    "reset_envs",
    "steps_to_return",
    "train_and_test",
]
