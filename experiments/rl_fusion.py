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

``lepton_mm.recipes.rl_fusion`` holds the config, the method names and what a record
keeps of a run; this script turns them into ledger records, tables and a figure.
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from lepton_mm import cli, harness
from lepton_mm.experiment import RunKey, format_mean_std
from lepton_mm.recipes.rl_fusion import (
    BLIND_RETURN,
    CONDITIONS,
    MDROP_SUFFIX,
    METHODS,
    SINGLE_SUFFIX,
    RLFusionConfig,
    catch_rate,  # noqa: F401  (notebooks/05_rl_fusion.ipynb reads it from here)
    parse_method,
    quick_config,
    record_metrics,
    resolve_methods,
)
from lepton_mm.rl import train_and_test


class RLFusion(harness.Experiment):
    """One run per (method, seed): a PPO agent trained from scratch and tested with
    every modality present and with each one absent."""

    name, script = "rl_fusion", "experiments/rl_fusion.py"
    config_class, quick_config = RLFusionConfig, staticmethod(quick_config)
    figures = ("curves.png",)
    flags = cli.config_flags(RLFusionConfig, (
        "env", "total_steps", "num_envs", "rollout_steps", "update_epochs", "minibatches",
        "learning_rate", "gamma", "gae_lambda", "clip_epsilon", "entropy_coef",
        "value_coef", "max_grad_norm", "dim", "hidden", "cnn_widths", "modality_dropout",
        "eval_envs", "eval_steps"))

    def methods(self) -> list[str]:
        return resolve_methods(self.config)

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
        stats = harness.seed_stats_of
        out = {}
        for method, rs in runs.items():
            out[method] = {
                "seeds": [r["seed"] for r in rs],
                "modalities": list(parse_method(method).modalities),
                "test_return": {
                    c: stats(rs, lambda r, c=c: r["metrics"]["test_return"][c])
                    for c in CONDITIONS},
                "random_return": stats(rs, lambda r: r["metrics"]["random_return"]),
                "final_return": stats(rs, lambda r: r["metrics"]["final_return"]),
                "steps_to_return_0.8": {
                    "per_seed": {str(r["seed"]): r["metrics"]["steps_to_return_0.8"] for r in rs},
                    "stats": stats(rs, lambda r: r["metrics"]["steps_to_return_0.8"])},
                "curve": {"env_steps": rs[0]["metrics"]["curve"]["env_steps"],
                          **harness.curve_stats(rs, lambda r: r["metrics"]["curve"]["return"])},
                "params": rs[0]["params"],
                "train_seconds": float(np.mean([r["train_seconds"] for r in rs])),
                "compile_seconds": float(np.mean([r["compile_seconds"] for r in rs])),
            }
        return out

    def tables(self, summary: dict[str, Any]) -> str:
        """Returns (mean ± sample std over seeds) and sample efficiency, per method."""
        def cell(stats: Mapping[str, Any] | None) -> str:
            return format_mean_std(stats, percent=False, digits=2)

        def steps(reached: Mapping[str, Any]) -> str:
            if reached["stats"] is not None:
                return format_mean_std(reached["stats"], digits=1, scale=1e-3) + " k"
            never = sum(v is None for v in reached["per_seed"].values())
            return f"not reached ({never} of {len(reached['per_seed'])} seeds)"

        lines = harness.markdown_table(
            ["method", "modalities", "params", "env steps to training return 0.8",
             "final training return", "test return, all present", "without pixels",
             "without state", "seeds"],
            ([method, " + ".join(s["modalities"]), f"{s['params']:,}",
              steps(s["steps_to_return_0.8"]), cell(s["final_return"]),
              *(cell(s["test_return"][c]) for c in CONDITIONS), len(s["seeds"])]
             for method, s in summary.items()))
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
        (mean over seeds; single modalities dashed, ``+mdrop`` dotted) with a band of
        ± one sample std."""
        labels = {m: f"{m} ({len(s['seeds'])})" for m, s in summary.items()}
        curves = {labels[m]: {"x": np.asarray(s["curve"]["env_steps"]) / 1000,
                              "mean": s["curve"]["mean"], "std": s["curve"]["std"]}
                  for m, s in summary.items()}
        styles = {labels[m]: "--" if m.endswith(SINGLE_SUFFIX) else
                  ":" if m.endswith(MDROP_SUFFIX) else "-" for m in summary}
        return [harness.plot_curves(
            curves, out / "curves.png", xlabel="environment steps (thousands)",
            ylabel="training episode return", styles=styles, ylim=(-1.05, 1.05),
            title="PPO on Catch (gymnax): fusion vs single modality",
            hline=(BLIND_RETURN, "a policy that ignores the ball"),
            legend_title="method (seeds)")]


def parse_args(argv: list[str] | None = None) -> tuple[RLFusionConfig, argparse.Namespace]:
    """Command line → ``(RLFusionConfig, the parsed arguments)``."""
    parser = cli.make_parser(
        RLFusion, doc=__doc__, quick="concat and state_only, one seed, 16 384 steps",
        methods=f"comma-separated: fusion names or <modality>_only (default: "
                f"{','.join(METHODS)}; --quick: concat,state_only)")
    args = parser.parse_args(argv)
    return cli.config_from_args(RLFusion, parser, args), args


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    return cli.run_main(RLFusion(config), args)


if __name__ == "__main__":
    cli.run_script(main)
