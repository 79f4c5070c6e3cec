"""The documentation site builds without a warning and documents every public name.

``mkdocs.yml`` renders ``docs/`` and an API reference, one page per public subpackage
(``docs/reference/*.md``, each a ``::: lepton_mm.<name>`` directive), which mkdocstrings
generates from the Google-style docstrings read by static analysis (griffe). The build is
strict: a broken link, an ``Args:`` entry naming no parameter or a section griffe cannot
parse fails it. The docstring rules checked here, on the same griffe data:

* functions have an ``Args:`` section (when they take arguments) and ``Returns:`` or
  ``Yields:`` (unless annotated ``-> None``);
* classes have a docstring; the constructor's arguments are documented under ``Args:``
  in the class or ``__init__`` docstring (``Attributes:`` for NamedTuples and
  dataclasses), and a ``__call__`` the class defines has ``Returns:`` in its own or the
  class docstring; exceptions need only a docstring;
* constants have a ``#:`` comment above their assignment (the Sphinx convention, read as
  their docstring by the griffe-sphinx extension);
* an argument annotated as an array states its shape (``[batch, dim]``) or says it is a
  scalar or a PRNG key.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import griffe
from griffe import DocstringSectionKind as Section

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference"

#: Public top-level modules without a page of their own, and why.
UNPAGED = {"lepton_mm.types": "EncoderOutput and masked_mean are documented at the top level"}

_DIRECTIVE = re.compile(r"^::: (lepton_mm(?:\.\w+)*)\s*$", re.MULTILINE)
_ARRAY = re.compile(r"\b(Array|ndarray|ArrayLike)\b")
_SHAPE = re.compile(r"\[|\bscalar\b|\bPRNG key\b|\bshape\b")


def _pages() -> dict[str, Path]:
    """Documented module → its reference page (``docs/reference/index.md`` is the top)."""
    pages = {}
    for page in sorted(REFERENCE.glob("*.md")):
        for module in _DIRECTIVE.findall(page.read_text(encoding="utf-8")):
            pages[module] = page
    return pages


def _page_url(page: Path) -> str:
    """The site URL of a reference page (``use_directory_urls``: ``reference/fusion/``)."""
    return "reference/" if page.stem == "index" else f"reference/{page.stem}/"


def _public_names() -> list[tuple[str, str]]:
    """``(module, name)`` for every name in every documented module's ``__all__``."""
    return [(module, name) for module in _pages()
            for name in importlib.import_module(module).__all__]


@functools.cache
def _package() -> griffe.Module:
    """lepton_mm as mkdocstrings sees it (mkdocs.yml's handler options)."""
    return griffe.load("lepton_mm", search_paths=[str(ROOT)], docstring_parser="google",
                       extensions=griffe.load_extensions("griffe_sphinx"),
                       resolve_aliases=True, resolve_external=False)


def _object(module: str, name: str) -> griffe.Object:
    parent = _package() if module == "lepton_mm" else _package()[
        module.removeprefix("lepton_mm.")]
    member = parent.members[name]
    return member.final_target if member.is_alias else member


def _inventory(path: Path) -> dict[str, tuple[str, str]]:
    """A Sphinx ``objects.inv`` (version 2) as ``{name: (domain:role, uri)}``."""
    raw = path.read_bytes()
    lines = raw.split(b"\n", 4)
    assert lines[0] == b"# Sphinx inventory version 2", lines[0]
    entries = {}
    for line in zlib.decompress(lines[4]).decode("utf-8").splitlines():
        match = re.match(r"(.+?)\s+(\S+:\S+)\s+-?\d+\s+(\S*)\s+.*$", line)
        assert match, line
        name, role, uri = match.groups()
        entries[name] = (role, uri.replace("$", name) if uri.endswith("$") else uri)
    return entries


def test_every_public_module_has_a_reference_page():
    pages = _pages()
    import lepton_mm

    public = {f"lepton_mm.{info.name}" for info in pkgutil.iter_modules(lepton_mm.__path__)
              if not info.name.startswith("_")}
    assert "lepton_mm" in pages
    assert public - set(pages) - set(UNPAGED) == set(), "add a page to docs/reference/"
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    unlisted = [p.name for p in set(pages.values()) if f"reference/{p.name}" not in nav]
    assert not unlisted, f"reference pages missing from mkdocs.yml's nav: {unlisted}"


def _build(site: Path) -> None:
    """``mkdocs build --strict`` into ``site`` (~15 s on 2 cores)."""
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-6000:]}"


def test_site_builds_strictly_with_every_public_name(tmp_path):
    # One test builds the site once (a module fixture would build it once per xdist worker).
    site = tmp_path / "site"
    _build(site)
    pages = _pages()

    # Every name of every documented __all__ is in the object inventory, on its page.
    inventory = _inventory(site / "objects.inv")
    absent, misplaced = [], []
    for module, name in _public_names():
        qualified = f"{module}.{name}"
        if qualified not in inventory:
            absent.append(qualified)
            continue
        target = getattr(importlib.import_module(module), name)
        expected = _page_url(pages[target.__name__] if inspect.ismodule(target)
                             else pages[module])
        if inventory[qualified][1].split("#")[0] != expected:
            misplaced.append(f"{qualified} at {inventory[qualified][1]}")
    assert not absent, f"public names missing from the site: {absent}"
    assert not misplaced, f"public names on the wrong page: {misplaced}"

    # Every API page shows signatures and a rendered Args (Parameters) table.
    for page in set(pages.values()):
        html = (site / _page_url(page) / "index.html").read_text(encoding="utf-8")
        assert 'class="doc-signature' in html, f"{page.name}: no signature rendered"
        assert 'doc-section-title">Parameters:' in html, f"{page.name}: no Parameters table"

    _check_screenshot(site, tmp_path)


def _check_screenshot(site: Path, tmp_path: Path) -> None:
    """The fusion reference page, opened in headless Chromium, renders with the theme:
    the header band in the theme's primary colour, dark text on a white page, and a
    signature block (skipped where Chromium is not installed, e.g. Debian's `chromium`
    package is missing)."""
    import numpy as np
    from PIL import Image

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which(
        "google-chrome")
    if browser is None:
        return
    shot = tmp_path / "fusion.png"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,900",
         f"--screenshot={shot}", (site / "reference" / "fusion" / "index.html").as_uri()],
        capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-3000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (900, 1280, 3)
    header = pixels[5:40, 300:1100]  # Material's default primary colour, indigo #4051b5
    assert (np.abs(header - (64, 81, 181)).sum(-1) < 30).mean() > 0.9
    body = pixels[60:, 250:1000]
    assert (body.min(-1) > 240).mean() > 0.5  # a white page ...
    assert (body.max(-1) < 100).mean() > 0.005  # ... with dark text on it
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # rendered, not a blank


# ------------------------------------------------------------------- docstring rules


def _sections(obj: griffe.Object | None) -> set[Section]:
    if obj is None or obj.docstring is None:
        return set()
    return {section.kind for section in obj.docstring.parsed}


def _returns_none(func: griffe.Function) -> bool:
    return func.returns is not None and str(func.returns) == "None"


def _arguments(func: griffe.Function) -> list[griffe.Parameter]:
    params = list(func.parameters)
    if params and params[0].name in ("self", "cls") and func.parent.is_class:
        params = params[1:]
    return params


def _is_exception(cls: griffe.Class) -> bool:
    return any(str(base).endswith(("Error", "Exception")) for base in cls.bases)


def _constructor(cls: griffe.Class) -> list[str]:
    """The constructor's argument names (dataclass fields included; NamedTuple fields)."""
    if any(str(base).endswith("NamedTuple") for base in cls.bases):
        return [n for n, m in cls.members.items() if m.is_attribute and not n.startswith("_")]
    try:
        return [p.name for p in cls.parameters if p.name not in ("self", "cls")]
    except ValueError:  # no __init__ that griffe can see (an external base class)
        return []


def missing_sections(obj: griffe.Object) -> list[str]:
    """What ``obj``'s docstring lacks under the rules in this file's docstring."""
    if obj.docstring is None or not obj.docstring.value.strip():
        return ["docstring" if not obj.is_attribute else "a #: comment above it"]
    sections = _sections(obj)
    if obj.is_class:
        if _is_exception(obj):
            return []
        missing = []
        init = obj.members.get("__init__")
        if _constructor(obj) and not (sections & {Section.parameters, Section.attributes}
                                      or Section.parameters in _sections(init)):
            missing.append("Args")
        call = obj.members.get("__call__")
        if call is not None and call.is_function and not _returns_none(call) and not (
                _sections(call) & {Section.returns, Section.yields}
                or Section.returns in sections):
            missing.append("Returns (__call__)")
        return missing
    if obj.is_function:
        missing = []
        if _arguments(obj) and Section.parameters not in sections:
            missing.append("Args")
        if not _returns_none(obj) and not sections & {Section.returns, Section.yields}:
            missing.append("Returns")
        return missing
    return []


def shapeless_arrays(obj: griffe.Object) -> list[str]:
    """Array-annotated arguments of ``obj`` (or of its public methods) given no shape."""
    if obj.is_class:
        found = []
        for name, member in obj.members.items():
            if member.is_alias or not member.is_function:
                continue
            if name == "__init__":  # its arguments may be documented in the class docstring
                found += shapeless_arrays_of(member, [obj.docstring, member.docstring])
            elif name == "__call__" or not name.startswith("_"):
                found += shapeless_arrays_of(member, [member.docstring])
        return found
    if obj.is_function:
        return shapeless_arrays_of(obj, [obj.docstring])
    return []


def shapeless_arrays_of(func: griffe.Function, docstrings: list) -> list[str]:
    described = {}
    for docstring in docstrings:
        for section in docstring.parsed if docstring is not None else []:
            if section.kind is Section.parameters:
                described.update({p.name: p.description for p in section.value})
    return [f"{func.name}({p.name})" for p in _arguments(func)
            if p.annotation is not None and _ARRAY.search(str(p.annotation))
            and not str(p.annotation).startswith("Callable") and p.name in described
            and not _SHAPE.search(described[p.name])]


def test_public_names_are_documented():
    problems, seen = [], set()
    for module, name in _public_names():
        obj = _object(module, name)
        if obj.path in seen:  # a re-export: checked where it is defined
            continue
        seen.add(obj.path)
        missing = missing_sections(obj)
        if missing:
            problems.append(f"{module}.{name}: lacks {', '.join(missing)}")
        shapeless = shapeless_arrays(obj)
        if shapeless:
            problems.append(f"{module}.{name}: no shape for {', '.join(shapeless)}")
    assert not problems, "\n".join(problems)


_RULES_EXAMPLE = '''
from typing import NamedTuple

import jax

#: A documented constant.
DOCUMENTED = ("a", "b")
UNDOCUMENTED = 1


def documented(x: jax.Array, *, scale: float = 1.0) -> jax.Array:
    """Scales ``x``.

    Args:
      x: float ``[batch, dim]``.
      scale: the factor.

    Returns:
      float ``[batch, dim]``.
    """


def no_returns(x):
    """Scales ``x``.

    Args:
      x: anything.
    """


def logs(x) -> None:
    """Logs ``x``.

    Args:
      x: anything.
    """


def shapeless(x: jax.Array, key: jax.Array) -> jax.Array:
    """Scales ``x``.

    Args:
      x: the input.
      key: a PRNG key.

    Returns:
      The output.
    """


class Layer:
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


class Pair(NamedTuple):
    """Two things."""

    a: int
    b: int


class Failure(ValueError):
    """Raised when it fails."""

    def __init__(self, reason):
        super().__init__(reason)
'''


def test_docstring_rules(tmp_path):
    path = tmp_path / "example.py"
    path.write_text(_RULES_EXAMPLE, encoding="utf-8")
    module = griffe.load("example", search_paths=[str(tmp_path)], docstring_parser="google",
                         extensions=griffe.load_extensions("griffe_sphinx"))
    rules = {name: missing_sections(obj) for name, obj in module.members.items()
             if not obj.is_alias}
    assert rules == {"DOCUMENTED": [], "UNDOCUMENTED": ["a #: comment above it"],
                     "documented": [], "no_returns": ["Returns"], "logs": [], "shapeless": [],
                     "Layer": ["Returns (__call__)"], "Pair": ["Args"], "Failure": []}
    assert shapeless_arrays(module["documented"]) == []
    assert shapeless_arrays(module["shapeless"]) == ["shapeless(x)"]
