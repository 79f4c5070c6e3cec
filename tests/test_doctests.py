"""The docstring examples of the pure modules run as doctests.

``lepton_mm.features.log_mel`` and ``lepton_mm.metrics`` are doctested in their own test
files (``test_log_mel.py``, ``test_metrics.py``), as are ``optim``, ``text_transformer`` and
``export``; this file covers the remaining pure modules.
"""

import doctest
import importlib

import pytest

MODULES = ["lepton_mm.alignment.losses", "lepton_mm.training.loggers", "lepton_mm.types"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    results = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert results.attempted > 0, f"{name} has no docstring examples"
    assert results.failed == 0, f"{results.failed} doctest failure(s) in {name}"
