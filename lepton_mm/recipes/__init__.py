"""Recipes: what one run of each published experiment is, importable.

A recipe holds an experiment's frozen config (with its ``--quick`` variant), its data,
its model and how one run trains and is scored, so that the script in ``experiments/``,
the benchmarks, the notebooks and the follow-up experiments (compression, noise-level
checks) build exactly the same thing. The scripts add what is theirs: the run ledger's
keys and hashes, the report's tables and the command line (``lepton_mm.harness``).

- ``lepton_mm.recipes.avmnist``: MultiBench's AV-MNIST recipe (LeNet encoders, a fusion
  layer, SGD) and its robustness protocol (``experiments/avmnist.py``).
- ``lepton_mm.recipes.alignment``: image-audio retrieval and the text-prompt audio
  classifier on AV-MNIST (``experiments/alignment.py``).
- ``lepton_mm.recipes.mustard``: sarcasm detection on MUStARD's official folds with
  all-MiniLM-L6-v2 (``experiments/mustard.py``).
- ``lepton_mm.recipes.rl_fusion``: fusion inside a PPO agent on Catch, seen as pixels
  and as a state vector (``experiments/rl_fusion.py``; needs the ``rl`` extra).
- ``lepton_mm.recipes.smoke``: a synthetic image + text + audio task for end-to-end checks
  (``experiments/smoke.py``).

Imports point one way: recipes use the rest of the library; nothing in it imports them.
"""

__all__: list[str] = []
