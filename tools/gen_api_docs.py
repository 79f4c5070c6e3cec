"""Generate ``docs/api.md``: every public name of lepton_mm, from its docstring.

For each module in ``MODULES`` and each name in its ``__all__`` the page shows the
signature, the docstring's first line and, from its Google-style sections, each argument
or attribute with the first sentence of its description (where the dtype and shape are
written) and what it returns. Names re-exported from another documented module link to
their entry there. Constants are documented by a ``#:`` comment above (or after) their
assignment, the Sphinx convention.

    python tools/gen_api_docs.py            # rewrite docs/api.md
    python tools/gen_api_docs.py --check    # exit 1 if docs/api.md is stale or a
                                            # public name lacks its Args/Returns sections

``tests/test_api_docs.py`` runs the same checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import pkgutil
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "api.md"

#: The documented modules, in page order; each has an ``__all__``.
MODULES = (
    "lepton_mm",
    "lepton_mm.data",
    "lepton_mm.features",
    "lepton_mm.encoders",
    "lepton_mm.pretrained",
    "lepton_mm.fusion",
    "lepton_mm.alignment",
    "lepton_mm.models",
    "lepton_mm.training",
    "lepton_mm.metrics",
    "lepton_mm.robustness",
    "lepton_mm.augment",
    "lepton_mm.adversarial",
    "lepton_mm.export",
    "lepton_mm.experiment",
    "lepton_mm.harness",
    "lepton_mm.functional",
)

_SECTION = re.compile(
    r"^(Args|Arguments|Attributes|Returns|Yields|Raises|Examples?|References|Notes?|"
    r"Shapes|Warning|See Also):\s*$")
_ENTRY = re.compile(r"^(\*{0,2}[A-Za-z_][\w.]*)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_MAX_SENTENCE = 160


# ----------------------------------------------------------------------- docstrings


@dataclasses.dataclass
class Doc:
    """A parsed Google-style docstring."""

    summary: str
    sections: dict[str, list[tuple[str, str]] | str]

    def entries(self, *names: str) -> list[tuple[str, str]]:
        for name in names:
            value = self.sections.get(name)
            if isinstance(value, list):
                return value
        return []

    def text(self, *names: str) -> str:
        for name in names:
            value = self.sections.get(name)
            if isinstance(value, str):
                return value
        return ""

    def has(self, *names: str) -> bool:
        return any(name in self.sections for name in names)


def own_doc(obj: Any) -> str:
    """``obj``'s own docstring (never one inherited from a base class), dedented."""
    if inspect.isclass(obj):
        doc = vars(obj).get("__doc__")
    else:
        doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def parse_doc(text: str) -> Doc:
    """Splits a docstring into its first line and its sections.

    ``Args``/``Arguments``/``Attributes`` become ``[(name, description)]``; every other
    section becomes its text with the lines joined.
    """
    lines = text.splitlines()
    summary = lines[0].strip() if lines else ""
    sections: dict[str, list[tuple[str, str]] | str] = {}
    i = 0
    while i < len(lines):
        match = _SECTION.match(lines[i].strip())
        indent = len(lines[i]) - len(lines[i].lstrip())
        if not match:
            i += 1
            continue
        name = {"Arguments": "Args", "Example": "Examples", "Note": "Notes"}.get(
            match.group(1), match.group(1))
        body: list[str] = []
        i += 1
        while i < len(lines) and (not lines[i].strip()
                                  or len(lines[i]) - len(lines[i].lstrip()) > indent):
            body.append(lines[i])
            i += 1
        body_text = inspect.cleandoc("\n".join(body))
        if name in ("Args", "Attributes"):
            sections[name] = _entries(body_text)
        else:
            sections[name] = " ".join(line.strip() for line in body_text.splitlines()
                                      if line.strip())
    return Doc(summary, sections)


def _entries(body: str) -> list[tuple[str, str]]:
    entries: list[tuple[str, str]] = []
    for line in body.splitlines():
        if not line.strip():
            continue
        match = _ENTRY.match(line) if not line[0].isspace() else None
        if match:
            entries.append((match.group(1), match.group(2).strip()))
        elif entries:
            name, text = entries[-1]
            entries[-1] = (name, f"{text} {line.strip()}".strip())
    return entries


def first_sentence(text: str) -> str:
    """The first sentence of ``text`` (where shapes are written), at most ~160 chars."""
    text = " ".join(text.split())
    match = re.search(r"(?<![.e]\.)(?<!e\.g)(?<!i\.e)\.(\s|$)", text)
    sentence = text[:match.start() + 1] if match else text
    if len(sentence) > _MAX_SENTENCE:
        cut = sentence[:_MAX_SENTENCE].rsplit(" ", 1)[0]
        if cut.count("``") % 2:  # do not leave a code span open
            cut = cut[:cut.rfind("``")].rstrip()
        sentence = cut.rstrip(",;:") + " …"
    return sentence


def markdown(text: str) -> str:
    """RST inline code (double backticks) to Markdown (single backticks)."""
    return text.replace("``", "`")


# ----------------------------------------------------------------------- signatures


def _format_default(value: Any) -> str:
    if inspect.isclass(value) or inspect.isfunction(value) or inspect.isbuiltin(value):
        return getattr(value, "__name__", repr(value))
    text = repr(value)
    if " at 0x" in text or text.startswith("<"):
        return getattr(value, "__name__", type(value).__name__)
    return text


def format_signature(name: str, signature: inspect.Signature, *, drop_first: bool = False,
                     returns: bool = True) -> str:
    """``name(a, b=1, *, c=None) -> Ret`` without parameter annotations."""
    params = list(signature.parameters.values())
    if drop_first and params:
        params = params[1:]
    parts: list[str] = []
    star_done = False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            star_done = True
        elif p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        elif p.default is p.empty:
            parts.append(p.name)
        else:
            parts.append(f"{p.name}={_format_default(p.default)}")
        if p.kind is p.POSITIONAL_ONLY and (
                p is params[-1] or params[params.index(p) + 1].kind is not p.POSITIONAL_ONLY):
            parts.append("/")
    ret = ""
    if returns and signature.return_annotation is not signature.empty:
        annotation = signature.return_annotation
        annotation = annotation if isinstance(annotation, str) else inspect.formatannotation(
            annotation)
        if annotation != "None":
            ret = f" -> {annotation}"
    one_line = f"{name}({', '.join(parts)}){ret}"
    if len(one_line) <= 90:
        return one_line
    body = "".join(f"    {part},\n" for part in parts)
    return f"{name}(\n{body}){ret}"


def class_signature(cls: type) -> inspect.Signature | None:
    """The constructor's signature, without ``self``; None for exceptions and the like."""
    if issubclass(cls, BaseException):
        return None
    init = None
    for base in cls.__mro__:
        if "__init__" in vars(base) and base.__module__.startswith("lepton_mm"):
            init = vars(base)["__init__"]
            break
    if init is not None:
        signature = inspect.signature(init)
        return signature.replace(parameters=list(signature.parameters.values())[1:])
    try:
        return inspect.signature(cls)
    except (TypeError, ValueError):
        return None


def returns_none(func: Callable[..., Any]) -> bool:
    """True when ``func`` is annotated ``-> None`` (so needs no Returns section)."""
    try:
        annotation = inspect.signature(func).return_annotation
    except (TypeError, ValueError):
        return False
    return annotation is None or annotation == "None"


def has_parameters(func: Callable[..., Any], *, method: bool = False) -> bool:
    try:
        params = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return True
    return len(params) > (1 if method else 0)


# ------------------------------------------------------------------------ constants


def _package_sources() -> dict[str, list[str]]:
    import lepton_mm

    sources: dict[str, list[str]] = {}
    for info in pkgutil.walk_packages(lepton_mm.__path__, "lepton_mm."):
        spec = importlib.util.find_spec(info.name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            sources[info.name] = Path(spec.origin).read_text(encoding="utf-8").splitlines()
    return sources


_SOURCES: dict[str, list[str]] | None = None


def constant_comment(name: str, value: Any) -> tuple[str, str] | None:
    """``(defining module, text)`` of the ``#:`` comment documenting constant ``name``.

    The defining module is the one whose top level assigns ``name`` to ``value``.
    """
    global _SOURCES
    if _SOURCES is None:
        _SOURCES = _package_sources()
    assignment = re.compile(rf"^{re.escape(name)}\s*(:[^=]*)?=")
    for module, lines in sorted(_SOURCES.items()):
        if getattr(sys.modules.get(module), name, None) is not value:
            continue
        for i, line in enumerate(lines):
            if not assignment.match(line):
                continue
            comment: list[str] = []
            j = i - 1
            while j >= 0 and lines[j].startswith("#:"):
                comment.insert(0, lines[j][2:].strip())
                j -= 1
            trailing = re.search(r"#:\s*(.*)$", line)
            if trailing:
                comment.append(trailing.group(1))
            return module, " ".join(comment)
    return None


# --------------------------------------------------------------------------- checks


def missing_sections(obj: Any) -> list[str]:
    """What ``obj``'s documentation lacks, as the API-docs test requires it.

    Functions: a docstring with ``Args:`` (if they take arguments) and ``Returns:`` or
    ``Yields:`` (unless annotated ``-> None``). Classes: a docstring; the class or its
    ``__init__`` documents the constructor arguments (``Args:``, or ``Attributes:`` for
    NamedTuples and dataclasses), and a ``__call__`` defined by the class has
    ``Returns:`` in its own or the class docstring. Exceptions: a docstring. Constants:
    a ``#:`` comment (checked by ``constant_comment``).
    """
    if inspect.isclass(obj):
        doc = parse_doc(own_doc(obj))
        if not doc.summary:
            return ["docstring"]
        if issubclass(obj, BaseException):
            return []
        missing = []
        signature = class_signature(obj)
        init = vars(obj).get("__init__")
        init_doc = parse_doc(own_doc(init)) if init is not None else Doc("", {})
        if signature is not None and signature.parameters and not (
                doc.has("Args", "Attributes") or init_doc.has("Args")):
            missing.append("Args")
        call = vars(obj).get("__call__")
        if call is not None and not returns_none(call):
            call_doc = parse_doc(own_doc(call))
            if not (call_doc.has("Returns", "Yields") or doc.has("Returns")):
                missing.append("Returns (__call__)")
        return missing
    if callable(obj):
        doc = parse_doc(own_doc(obj))
        if not doc.summary:
            return ["docstring"]
        missing = []
        if has_parameters(obj) and not doc.has("Args"):
            missing.append("Args")
        if not returns_none(obj) and not doc.has("Returns", "Yields"):
            missing.append("Returns")
        return missing
    return []


def public_names() -> list[tuple[str, str, Any]]:
    """``(module, name, object)`` for every name in every documented ``__all__``."""
    out = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            out.append((module_name, name, getattr(module, name)))
    return out


def audit() -> list[str]:
    """Every public name whose documentation is incomplete, as ``"module.name: what"``."""
    problems = []
    for module_name, name, obj in public_names():
        if inspect.ismodule(obj):
            continue
        if inspect.isclass(obj) or callable(obj):
            missing = missing_sections(obj)
        else:
            found = constant_comment(name, obj)
            missing = [] if found and found[1] else ["#: comment"]
        if missing:
            problems.append(f"{module_name}.{name}: missing {', '.join(missing)}")
    return problems


# ------------------------------------------------------------------------ rendering


def _home(obj: Any) -> str | None:
    """The documented module that defines ``obj`` (its canonical entry), if any."""
    module = getattr(obj, "__module__", None)
    if not isinstance(module, str):
        return None
    best = None
    for candidate in MODULES:
        if (module == candidate or module.startswith(candidate + ".")) and (
                best is None or len(candidate) > len(best)):
            best = candidate
    return best


def _anchor(qualified: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "", qualified.lower().replace(" ", "-"))


def _entry_lines(entries: list[tuple[str, str]]) -> list[str]:
    return [f"- `{name}`: {markdown(first_sentence(text))}" for name, text in entries]


def _returns_line(doc: Doc) -> list[str]:
    text = doc.text("Returns", "Yields")
    if not text:
        return []
    label = "Returns" if "Returns" in doc.sections else "Yields"
    return [f"- *{label.lower()}*: {markdown(first_sentence(text))}"]


def _render_function(qualified: str, func: Any) -> list[str]:
    doc = parse_doc(own_doc(func))
    try:
        signature = format_signature(qualified.rsplit(".", 1)[1], inspect.signature(func))
    except (TypeError, ValueError):
        signature = qualified.rsplit(".", 1)[1] + "(...)"
    lines = [f"### `{qualified}`", "", "```python", signature, "```", ""]
    if doc.summary:
        lines += [markdown(doc.summary), ""]
    details = _entry_lines(doc.entries("Args")) + _returns_line(doc)
    if details:
        lines += [*details, ""]
    return lines


def _member_lines(cls: type) -> list[str]:
    lines = []
    for name, member in vars(cls).items():
        if name.startswith("_") and name != "__call__":
            continue
        if isinstance(member, property):
            doc = parse_doc(own_doc(member.fget))
            lines.append(f"- `.{name}` (property): {markdown(doc.summary)}".rstrip(": "))
            continue
        func = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
        if not inspect.isfunction(func):
            continue
        doc = parse_doc(own_doc(func))
        is_method = not isinstance(member, staticmethod)
        signature = format_signature(name, inspect.signature(func), drop_first=is_method)
        signature = " ".join(signature.split()).replace("( ", "(").replace(",)", ")")
        prefix = "classmethod " if isinstance(member, classmethod) else ""
        line = f"- {prefix}`{signature}`"
        if doc.summary:
            line += f": {markdown(doc.summary)}"
        lines.append(line)
        for arg, text in doc.entries("Args"):
            lines.append(f"  - `{arg}`: {markdown(first_sentence(text))}")
        returns = doc.text("Returns", "Yields")
        if returns:
            lines.append(f"  - *returns*: {markdown(first_sentence(returns))}")
    return lines


def _render_class(qualified: str, cls: type) -> list[str]:
    doc = parse_doc(own_doc(cls))
    short = qualified.rsplit(".", 1)[1]
    signature = class_signature(cls)
    if signature is None:
        bases = ", ".join(b.__name__ for b in cls.__bases__)
        header = f"class {short}({bases})"
    else:
        header = "class " + format_signature(short, signature, returns=False)
    lines = [f"### `{qualified}`", "", "```python", header, "```", ""]
    if doc.summary:
        lines += [markdown(doc.summary), ""]
    init = vars(cls).get("__init__")
    init_doc = parse_doc(own_doc(init)) if init is not None else Doc("", {})
    args = doc.entries("Args") or init_doc.entries("Args")
    attributes = doc.entries("Attributes")
    if args:
        lines += ["Arguments:", "", *_entry_lines(args), ""]
    if attributes:
        lines += ["Attributes:", "", *_entry_lines(attributes), ""]
    returns = _returns_line(doc)
    if returns:
        lines += [*returns, ""]
    members = _member_lines(cls)
    if members:
        lines += ["Methods and properties:", "", *members, ""]
    return lines


def _render_constant(qualified: str, value: Any) -> list[str]:
    found = constant_comment(qualified.rsplit(".", 1)[1], value)
    text = found[1] if found else ""
    kind = type(value).__name__
    if isinstance(value, tuple) and len(repr(value)) <= 80:  # immutable: safe to show
        kind += f" `{value!r}`"
    lines = [f"### `{qualified}`", "", f"*{kind}*" + (f": {markdown(text)}" if text else ""),
             ""]
    return lines


def render() -> str:
    """The full text of ``docs/api.md``."""
    out = [
        "# API reference",
        "",
        "<!-- Generated by tools/gen_api_docs.py from the docstrings: do not edit by hand."
        " -->",
        "",
        "Every public name of lepton_mm: its signature, the first line of its docstring and,",
        "for each argument, the first sentence of its description (dtype and shape, in the",
        "library's layout: images `[batch, height, width, channels]`, tokens",
        "`[batch, time, dim]` with a bool mask `[batch, time]`, pooled `[batch, dim]`).",
        "The docstrings hold the rest. Regenerate with `python tools/gen_api_docs.py`;",
        "`tests/test_api_docs.py` fails when this file is stale.",
        "",
        "## Contents",
        "",
    ]
    for module_name in MODULES:
        out.append(f"- [`{module_name}`](#{_anchor(module_name)})")
    out.append("")
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        out += [f"## `{module_name}`", ""]
        summary = parse_doc(own_doc(module)).summary
        if summary:
            out += [markdown(summary), ""]
        table = ["| name | kind | summary |", "|---|---|---|"]
        body: list[str] = []
        for name in module.__all__:
            obj = getattr(module, name)
            qualified = f"{module_name}.{name}"
            if inspect.ismodule(obj):
                sub_summary = parse_doc(own_doc(obj)).summary
                table.append(f"| [`{name}`](#{_anchor(obj.__name__)}) | module | "
                             f"{markdown(sub_summary)} |")
                continue
            home = _home(obj) if (inspect.isclass(obj) or callable(obj)) else module_name
            if home is not None and home != module_name and home in MODULES:
                target = f"{home}.{name}"
                table.append(f"| `{name}` | re-export | `{qualified}` is "
                             f"[`{target}`](#{_anchor(target)}) |")
                continue
            if inspect.isclass(obj):
                kind = "exception" if issubclass(obj, BaseException) else "class"
                body += _render_class(qualified, obj)
                summary_line = parse_doc(own_doc(obj)).summary
            elif callable(obj):
                kind = "function"
                body += _render_function(qualified, obj)
                summary_line = parse_doc(own_doc(obj)).summary
            else:
                kind = "constant"
                body += _render_constant(qualified, obj)
                found = constant_comment(name, obj)
                summary_line = first_sentence(found[1]) if found else ""
            cell = markdown(summary_line).replace("|", r"\|")
            table.append(f"| [`{name}`](#{_anchor(qualified)}) | {kind} | {cell} |")
        out += [*table, "", *body]
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="report stale docs/api.md and incomplete docstrings; write "
                             "nothing")
    args = parser.parse_args(argv)
    text = render()
    if not args.check:
        OUTPUT.parent.mkdir(parents=True, exist_ok=True)
        OUTPUT.write_text(text, encoding="utf-8")
        print(f"wrote {OUTPUT.relative_to(ROOT)} ({len(text.splitlines())} lines)")
        return 0
    status = 0
    if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != text:
        print(f"{OUTPUT.relative_to(ROOT)} is stale: run python tools/gen_api_docs.py")
        status = 1
    problems = audit()
    for problem in problems:
        print(problem)
    return status or int(bool(problems))


if __name__ == "__main__":
    sys.exit(main())
