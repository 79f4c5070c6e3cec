"""docs/api.md documents every public name, and is current.

The rules (implemented by ``tools/gen_api_docs.py``, which also writes the page):

* every name in ``lepton_mm.__all__`` and in each documented subpackage's ``__all__``
  appears in ``docs/api.md``, and the page equals what the generator writes now;
* functions have a docstring with an ``Args:`` section (when they take arguments) and a
  ``Returns:``/``Yields:`` section (unless annotated ``-> None``);
* classes have a docstring; the constructor's arguments are documented under ``Args:``
  in the class or ``__init__`` docstring (``Attributes:`` for NamedTuples and
  dataclasses), and a ``__call__`` the class defines has ``Returns:`` in its own or the
  class docstring; exceptions need only a docstring;
* constants (module-level values such as ``FUSIONS``) have a ``#:`` comment above their
  assignment (the Sphinx convention the code base already uses); submodules listed in
  ``__all__`` are documented by their own section.
"""

import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
API_MD = ROOT / "docs" / "api.md"


def _load_generator():
    name = "_lepton_gen_api_docs"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "gen_api_docs.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[name]


gen = _load_generator()
PUBLIC = [(module, name) for module, name, _ in gen.public_names()]


@pytest.mark.parametrize("module_name, name", PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_public_name_is_documented(module_name, name):
    obj = getattr(importlib.import_module(module_name), name)
    if inspect.ismodule(obj):
        assert gen.parse_doc(gen.own_doc(obj)).summary, f"{obj.__name__} has no docstring"
        return
    if inspect.isclass(obj) or callable(obj):
        missing = gen.missing_sections(obj)
    else:
        found = gen.constant_comment(name, obj)
        missing = [] if found and found[1] else ["a #: comment above the assignment"]
    assert not missing, f"{module_name}.{name}: docstring lacks {', '.join(missing)}"


def test_every_public_name_appears_in_api_md():
    text = API_MD.read_text(encoding="utf-8")
    absent = [f"{m}.{n}" for m, n in PUBLIC if f"`{m}.{n}`" not in text]
    assert not absent, f"missing from docs/api.md: {absent}"


def test_api_md_is_up_to_date():
    assert API_MD.read_text(encoding="utf-8") == gen.render(), (
        "docs/api.md is stale: run `python tools/gen_api_docs.py` and commit the result")


# ------------------------------------------------------------ the checker's own rules


def _documented(x, *, scale=1.0):
    """Scales ``x``.

    Args:
      x: float ``[batch, dim]``.
      scale: the factor.

    Returns:
      float ``[batch, dim]``.
    """
    return x * scale


def _undocumented_returns(x):
    """Scales ``x``.

    Args:
      x: float ``[batch, dim]``.
    """
    return x


def _returns_none(x) -> None:
    """Logs ``x``.

    Args:
      x: anything.
    """


class _Module:
    """A layer.

    Args:
      dim: feature size.
    """

    def __init__(self, dim):
        self.dim = dim

    def __call__(self, x):
        """Applies the layer.

        Args:
          x: float ``[batch, dim]``.
        """
        return x


def test_checker_rules():
    assert gen.missing_sections(_documented) == []
    assert gen.missing_sections(_undocumented_returns) == ["Returns"]
    assert gen.missing_sections(_returns_none) == []
    assert gen.missing_sections(_Module) == ["Returns (__call__)"]
    doc = gen.parse_doc(inspect.getdoc(_documented))
    assert doc.summary == "Scales ``x``."
    assert doc.entries("Args") == [("x", "float ``[batch, dim]``."), ("scale", "the factor.")]
    assert gen.first_sentence("float ``[batch]``, e.g. ones. More.") == (
        "float ``[batch]``, e.g. ones.")
    signature = gen.format_signature("_documented", inspect.signature(_documented))
    assert signature == "_documented(x, *, scale=1.0)"
