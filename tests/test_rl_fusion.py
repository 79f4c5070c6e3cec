"""lepton_mm.rl and experiments/rl_fusion.py: PPO pieces against hand-computed values,
presence masks in the agent, clear errors for bad arguments (the rl extra named when it
is missing), and one tiny run end to end through the ledger (it learns: its test return
clears the uniform policy's by a wide margin).

Cost: one training program and one test program are compiled (the run), the rest is
eager or compiles nothing; about 20 s on a 2-core CPU."""

import shlex
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_mm.rl import (
    PPOConfig,
    advantages,
    make_agent,
    make_env,
    ppo_loss,
    steps_to_return,
)
from lepton_mm.rl._extra import require

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rl(load_script):
    return load_script("rl_fusion")


def gae_reference(rewards, terminated, values, last_value, gamma, lam):
    """GAE by the textbook backward recursion, one environment at a time."""
    steps, envs = rewards.shape
    adv = np.zeros((steps, envs))
    for e in range(envs):
        acc = 0.0
        for t in reversed(range(steps)):
            next_value = last_value[e] if t == steps - 1 else values[t + 1, e]
            keep = 0.0 if terminated[t, e] else 1.0
            delta = rewards[t, e] + gamma * keep * next_value - values[t, e]
            acc = delta + gamma * lam * keep * acc
            adv[t, e] = acc
    return adv


def test_advantages_match_the_backward_recursion():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(6, 3)).astype(np.float32)
    terminated = rng.random((6, 3)) < 0.3
    values = rng.normal(size=(6, 3)).astype(np.float32)
    last = rng.normal(size=3).astype(np.float32)
    adv, targets = advantages(jnp.asarray(rewards), jnp.asarray(terminated),
                              jnp.asarray(values), jnp.asarray(last), gamma=0.9,
                              gae_lambda=0.8)
    expected = gae_reference(rewards, terminated, values, last, 0.9, 0.8)
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(targets, expected + values, rtol=1e-5, atol=1e-6)


def test_ppo_loss_matches_hand_computed_terms():
    logits = np.array([[0.2, -0.1, 0.5], [1.0, 0.0, -1.0], [0.0, 0.3, 0.1],
                       [-0.4, 0.2, 0.9]], np.float32)
    actions = np.array([2, 0, 1, 1], np.int32)
    old_log_probs = np.array([-1.2, 0.0, -0.9, -2.5], np.float32)
    values = np.array([0.5, -0.2, 0.1, 0.9], np.float32)
    old_values = np.array([0.2, -0.3, 0.4, 0.1], np.float32)
    adv = np.array([1.0, -0.5, 0.3, 2.0], np.float32)
    targets = np.array([0.7, -0.4, 0.0, 1.5], np.float32)
    eps, vc, ec = 0.2, 0.5, 0.01

    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ratio = np.exp(log_softmax[np.arange(4), actions] - old_log_probs)
    a = (adv - adv.mean()) / (adv.std() + 1e-8)
    policy = -np.mean(np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a))
    clipped = old_values + np.clip(values - old_values, -eps, eps)
    value = 0.5 * np.mean(np.maximum((values - targets) ** 2, (clipped - targets) ** 2))
    entropy = -np.mean((np.exp(log_softmax) * log_softmax).sum(1))

    loss, terms = jax.jit(lambda *x: ppo_loss(*x, clip_epsilon=eps, value_coef=vc,
                                               entropy_coef=ec))(
        logits, values, actions, old_log_probs, old_values, adv, targets)
    np.testing.assert_allclose(terms.policy, policy, rtol=1e-5)
    np.testing.assert_allclose(terms.value, value, rtol=1e-5)
    np.testing.assert_allclose(terms.entropy, entropy, rtol=1e-5)
    np.testing.assert_allclose(loss, policy + vc * value - ec * entropy, rtol=1e-5)
    assert ratio.min() < 1 - eps and ratio.max() > 1 + eps  # both clips are exercised


def test_an_absent_modality_cannot_move_the_policy():
    from flax import nnx

    from lepton_mm.functional import functional

    spec = make_env("catch")
    assert spec.modalities == ("pixels", "state")
    agent = make_agent(spec, "gated", spec.modalities, dim=8, hidden=8, cnn_widths=(4,),
                       rngs=nnx.Rngs(0))
    apply, variables = functional(agent)
    state = spec.env.reset(jax.random.key(0), spec.params)[1]
    obs = jax.tree.map(lambda x: jnp.stack([x] * 4), spec.observe(state))
    assert obs["pixels"].shape == (4, 10, 5, 1) and obs["state"].shape == (4, 3)
    noise = jax.random.normal(jax.random.key(1), obs["pixels"].shape[1:])
    obs["pixels"] = obs["pixels"].at[1::2].set(noise)  # rows 1, 3: other pixels
    present = {"pixels": jnp.array([False, False, True, True])}
    out = jax.jit(apply)(variables, {**obs, "present": present})
    assert out.shape == (4, spec.num_actions + 1)
    np.testing.assert_array_equal(out[0], out[1])  # pixels absent: unchanged
    assert not np.allclose(out[2], out[3])  # pixels present: they matter


def test_unknown_environment_fusion_or_modality_is_a_clear_error(rl):
    from flax import nnx

    with pytest.raises(ValueError, match="env: unknown environment 'pong'"):
        rl.RLFusionConfig(env="pong")
    with pytest.raises(ValueError, match="env: unknown environment 'pong'"):
        make_env("pong")
    with pytest.raises(ValueError, match="methods: unknown method 'nope'"):
        rl.RLFusion(rl.RLFusionConfig(methods=("concat", "nope"))).methods()
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        rl.parse_method("audio_only")
    spec = make_env("catch")
    with pytest.raises(ValueError, match="fusion: unknown fusion 'nope'"):
        make_agent(spec, "nope", spec.modalities, dim=8, hidden=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="modalities: unknown modality 'audio'"):
        make_agent(spec, None, ("audio",), dim=8, hidden=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="fusion: 'concat' with modalities"):
        make_agent(spec, "concat", ("state",), dim=8, hidden=8, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(("overrides", "match"), [
    ({"total_steps": 100}, "total_steps: expected at least num_envs \\* rollout_steps = 512"),
    ({"minibatches": 3}, "minibatches: must divide num_envs \\* rollout_steps = 512"),
    ({"num_envs": 0}, "num_envs: expected a positive integer"),
    ({"gamma": 1.5}, "gamma: expected a number in \\[0, 1\\]"),
    ({"modality_dropout": 1.0}, "modality_dropout: expected a rate in \\(0, 1\\)"),
    ({"cnn_widths": (8, 0)}, "cnn_widths\\[1\\]: expected a positive integer"),
])
def test_bad_settings_are_refused_by_the_experiment_config(rl, overrides, match):
    # RLFusionConfig hands its PPO and agent settings to lepton_mm.rl's configs to check.
    with pytest.raises(ValueError, match=match):
        rl.RLFusionConfig(**overrides)
    if "cnn_widths" not in overrides:
        with pytest.raises(ValueError, match=match):
            PPOConfig(**overrides)


def test_steps_to_return_is_the_first_window_to_reach_the_threshold():
    curve = {"env_steps": [10, 20, 30, 40, 50], "return": [0.5, 0.9, 0.6, None, 0.9]}
    assert steps_to_return(curve, 0.72, window=2) == 30  # (0.9 + 0.6) / 2
    assert steps_to_return(curve, 0.8, window=2) == 50  # the None update is left out
    assert steps_to_return(curve, 0.85, window=1) == 20
    assert steps_to_return(curve, 0.95, window=1) is None


def test_the_rl_extra_is_imported_on_first_use_and_named_when_missing():
    probe = ("import sys, lepton_mm, lepton_mm.rl\n"
             "print(sorted({'gymnax', 'rlax'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"
    with pytest.raises(ImportError, match=r"lepton_mm\.rl needs nope_not_a_package .*"
                                          r"'rl' extra: pip install 'lepton_mm\[rl\]'"):
        require("nope_not_a_package")


def test_command_line_rejects_bad_arguments_before_training(rl, tmp_path, capsys):
    out = ["--workdir", str(tmp_path), "--results", str(tmp_path / "r")]
    assert rl.main(["--methods", "concat,nope", *out]) == 2
    assert "methods: unknown method 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        rl.main(["--env", "pong", *out])
    assert exit_info.value.code == 2
    assert "env: unknown environment 'pong'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def tiny_run(rl, tmp_path_factory):
    """``concat`` on Catch for 8 192 steps (16 updates), a small pixel encoder, through
    the ledger."""
    root = tmp_path_factory.mktemp("rl_fusion")
    config = rl.RLFusionConfig(methods=("concat",), seeds=(0,), total_steps=8192,
                               cnn_widths=(8,), learning_rate=3e-3, eval_envs=64,
                               workdir=str(root / "work"), results=str(root / "results"))
    experiment = rl.RLFusion(config)
    experiment.run()
    (record,) = experiment.ledger.records()
    return experiment, record, root


def test_tiny_run_learns_to_beat_a_policy_that_ignores_the_ball(rl, tiny_run):
    _, record, _ = tiny_run
    m = record["metrics"]
    # A policy blind to the ball catches it 1 time in 5 (return -0.6, exactly); the
    # uniform policy's measured return is a check of the environment and the test loop.
    assert abs(m["random_return"] - rl.BLIND_RETURN) < 0.1
    assert m["test_return"]["all"] > rl.BLIND_RETURN + 0.8
    assert m["test_accuracy"] == pytest.approx(rl.catch_rate(m["test_return"]["all"]))
    assert m["test_episodes"]["all"] == 64 * 10  # 90 steps, 9 per episode
    curve = m["curve"]
    assert curve["env_steps"] == [512 * (i + 1) for i in range(16)]
    assert np.mean(curve["return"][-4:]) > np.mean(curve["return"][:4]) + 0.5


def test_tiny_run_record_reproduces_and_reports(rl, tiny_run):
    experiment, record, root = tiny_run
    config, _ = rl.parse_args(shlex.split(record["command"])[2:])
    assert experiment.run_config("concat") == rl.RLFusion(config).run_config("concat")
    result = experiment.report(root / "report")
    assert result["complete"] and result["current_runs"] == 1
    table = (root / "report" / "results.md").read_text()
    assert "| concat | pixels + state |" in table
    assert (root / "report" / "curves.png").stat().st_size > 0


def test_results_doc_holds_the_report_of_the_committed_records(rl, tmp_path):
    config, _ = rl.parse_args(["--seeds", "0,1,2", "--results", str(ROOT / "results")])
    experiment = rl.RLFusion(config)
    result = experiment.report(tmp_path)
    assert result["expected_runs"] == 18
    assert experiment.docs_block(tmp_path) in (ROOT / "docs" / "results.md").read_text(), (
        "docs/results.md is out of date with results/rl_fusion: run python "
        "experiments/rl_fusion.py --seeds 0,1,2 --report --out runs/rl_fusion_report "
        "--docs docs/results.md")
