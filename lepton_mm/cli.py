"""Experiment scripts' command lines, generated from their config dataclasses.

A script's settings are a frozen config dataclass (``lepton_mm.recipes``, or the script's
own for a tool); its flags are generated from the fields, so no script writes
``add_argument``, and ``--help`` gives each flag the field's ``Attributes:`` entry of the
config docstring and its default:

- ``add_flags`` adds a flag per ``(field, flag)`` pair (``config_flags`` names every
  field ``--field-name``), typed from the field's annotation: ``bool`` fields get
  ``--x/--no-x``; ``tuple[int | float | str, ...]`` fields comma-separated lists
  (``--seeds 0,1,2``, ``--snr-sweep=10,-20``, ``--sparsity ''`` for none; blank items
  are skipped); ``int``, ``float`` and ``str`` fields their type; an optional field
  (``X | None``) also takes ``none``. ``flag_overrides`` returns the fields given.
- ``make_parser`` and ``config_from_args`` give a ``harness.Experiment`` script its
  command line: the method flag, the flags every experiment shares (``add_arguments``:
  ``--seeds``, ``--quick``, ``--shard``, ``--report``, ``--out``, ``--docs``, ...),
  ``--config FILE`` (a TOML file of config fields; ``experiments/configs/`` holds the
  published tables') and the experiment's ``flags``; later sources win, in that order.
  Its ``--help`` ends with the fields only a config file sets.
- ``run_main`` trains what the ledger lacks or reports; ``run_script`` runs ``main``
  under ``if __name__ == "__main__":``.

Every error is one line on stderr and exit status 2, ``<script>: error: <message>``,
naming the flag (a malformed value, an unknown flag), the file and key (``--config``)
or the config field (a value the config rejects).

**Why argparse, not tyro (issue 16).** tyro 1.0.17 was tried on these configs. It reads
every recorded command only with help on each field: a ``PrimitiveConstructorSpec`` per
tuple field (its own lists are space-separated, ``--seeds 0 1 2``, so ``--seeds 0,1,2``
fails), ``tyro.conf.DisallowNone`` on each optional field (a plain ``bool | None``
becomes ``--progress {None,True,False}`` and ``--no-progress`` is refused as a missing
value) and ``tyro.conf.arg(name=...)`` for the renamed flags (``--fusion``,
``--image-noise``). Its defaults would have to stay None, since ours depend on other
flags (``--quick`` picks the quick config, ``--results`` is ``WORKDIR/results`` under
``--quick``, a ``--config`` file sits under the flags, ``--seed`` or ``--seeds``), so
``--help`` would print ``(default: None)``; and it reads no ``a, b: text`` docstring
entries (ten of ``RLFusionConfig``'s 25 fields got no help). What it cannot give is the
one-line error: each parse error is a 5- to 13-line box on stderr, in both of its
backends, with no public way to get the message (``console_outputs=False`` drops it);
keeping one line would mean scraping its rendered box. ml_collections' config flags
(``--config.seeds``) would change the recorded commands. So the typed flags stay
generated here (``add_flags`` and its helpers, about 60 lines of code), on argparse.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from lepton_mm import experiment as ledger
from lepton_mm.harness import enable_compilation_cache, flag_text, update_docs

if TYPE_CHECKING:
    from lepton_mm.harness import Experiment

__all__ = [
    "add_arguments",
    "add_flags",
    "base_overrides",
    "config_file",
    "config_flags",
    "config_from_args",
    "flag_overrides",
    "make_config",
    "make_parser",
    "parse_config",
    "parse_floats",
    "parse_ints",
    "run_main",
    "run_script",
    "script_parser",
]

#: Config fields the shared flags set (``add_arguments``), never ``add_flags``.
_SHARED = ("seeds", "workdir", "results", "quick", "progress")


def _items(text: str, kind: Callable[[str], Any], name: str) -> tuple[Any, ...]:
    try:
        return tuple(kind(s.strip()) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated {name}, got {text!r}") from None


def parse_ints(text: str) -> tuple[int, ...]:
    """Comma-separated ints, for argparse ``type=``.

    Args:
      text: e.g. ``"0,1,2"`` (blank items are skipped).

    Returns:
      ``(0, 1, 2)``.

    Raises:
      argparse.ArgumentTypeError: an item is not an integer.
    """
    return _items(text, int, "integers")


def parse_floats(text: str) -> tuple[float, ...]:
    """Comma-separated floats, for argparse ``type=``.

    Args:
      text: e.g. ``"20,-5.5"`` (blank items are skipped).

    Returns:
      ``(20.0, -5.5)``.

    Raises:
      argparse.ArgumentTypeError: an item is not a number.
    """
    return _items(text, float, "numbers")


def _parse_strs(text: str) -> tuple[str, ...]:
    return _items(text, str, "words")


def _scalar(kind: type, name: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None

    return parse


#: Annotation (its first part) -> argparse ``type=`` of a flag.
_TYPES: dict[str, Callable[[str], Any]] = {
    "tuple[int": parse_ints, "tuple[float": parse_floats, "tuple[str": _parse_strs,
    "int": _scalar(int, "an integer"), "float": _scalar(float, "a number"), "str": str}


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: ``<prog>: error: <message>``, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def script_parser(doc: str, *, epilog: str | None = None) -> argparse.ArgumentParser:
    """An empty parser for a script, whose errors are one line.

    Args:
      doc: the script's docstring (its first line describes it in ``--help``).
      epilog: text after the flags in ``--help`` (kept as written).

    Returns:
      The parser: ``add_flags`` adds the flags; a malformed or unknown flag is
      ``<script>: error: <message>`` on stderr, exit status 2, without argparse's usage
      block.
    """
    return _Parser(description=textwrap.fill(doc.strip().splitlines()[0], 79),
                   epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)


def _annotation_text(kind: Any) -> str:
    """A dataclass field's type as text: ``"float"``, ``"tuple[int, ...]"``, ... (it
    already is a string under ``from __future__ import annotations``)."""
    if isinstance(kind, str):
        return kind
    return kind.__name__ if isinstance(kind, type) else str(kind)


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _field_help(config_cls: type) -> dict[str, str]:
    """Field name -> its description in the config class docstring's ``Attributes:``
    (``name: text`` or ``a, b, c: text``, continuation lines indented deeper)."""
    out: dict[str, str] = {}
    names: list[str] = []
    inside = False
    for line in (config_cls.__doc__ or "").splitlines():
        text = line.strip()
        if text == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        if not text or (not line.startswith(" " * 6) and text.endswith(":")):
            if not text:
                continue
            break
        head, sep, rest = text.partition(": ")
        if sep and line.startswith(" " * 6) and not line.startswith(" " * 7) and all(
                part.strip().isidentifier() for part in head.split(",")):
            names = [part.strip() for part in head.split(",")]
            for name in names:
                out[name] = rest
        else:
            for name in names:
                out[name] += " " + text
    return out


def config_flags(config_cls: type, fields: Sequence[str] | None = None, *,
                 names: Mapping[str, str] | None = None) -> tuple[tuple[str, str], ...]:
    """``(field, flag)`` pairs for ``add_flags``: ``--field-name`` per field.

    Args:
      config_cls: the config dataclass.
      fields: the fields that get a flag (default: all of them, in order).
      names: flags named otherwise, by field (e.g. ``{"methods": "--fusion"}``).

    Returns:
      ``(("num_test", "--num-test"), ...)``.
    """
    fields = [f.name for f in dataclasses.fields(config_cls)] if fields is None else fields
    return tuple((f, (names or {}).get(f, "--" + f.replace("_", "-"))) for f in fields)


def add_flags(parser: argparse.ArgumentParser, config_cls: type,
              flags: Sequence[tuple[str, str]]) -> None:
    """Adds a flag per ``(field, flag)`` pair, typed from ``config_cls``'s field.

    ``bool`` fields get ``--x/--no-x``; ``tuple[int | float | str, ...]``
    comma-separated lists (``--x=1,-2`` for negative values; ``--x ''`` for none);
    numbers and strings their type; an optional field (``X | None``) also takes
    ``none``. A flag not given leaves no attribute (``flag_overrides``); its help is the
    field's description in the config docstring's ``Attributes:`` section and its
    default.

    Args:
      parser: the script's parser.
      config_cls: the config dataclass.
      flags: ``(field, flag)`` pairs (``config_flags``, ``Experiment.flags``).

    Raises:
      TypeError: a field's type has no flag (a tuple of another type, a mapping).
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    descriptions = _field_help(config_cls)
    for field, flag in flags:
        annotation = _annotation_text(fields[field].type)
        parts = [p.strip() for p in annotation.split("|")]
        default = _default(fields[field])
        kind: dict[str, Any]
        if parts[0] == "bool":
            kind = {"action": argparse.BooleanOptionalAction}
        else:
            parse = next((t for prefix, t in _TYPES.items() if parts[0].startswith(prefix)
                          and (prefix.startswith("tuple") or parts[0] == prefix)), None)
            if parse is None:
                raise TypeError(f"add_flags: {config_cls.__name__}.{field} is {annotation};"
                                " flags support bool, int, float, str and tuples of int, "
                                "float or str.")
            if "None" in parts:
                parse = _or_none(parse)
            kind = {"type": parse}
        shown = "none" if default is None else flag_text(default) or "''"
        parser.add_argument(flag, dest=field, default=argparse.SUPPRESS, **kind,
                            help=f"{descriptions.get(field, field)} (default: {shown})")


def _or_none(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda text: None if text.strip().lower() == "none" else parse(text)


def flag_overrides(args: argparse.Namespace,
                   flags: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The config fields given on the command line through ``add_flags``.

    Args:
      args: the parsed arguments.
      flags: the ``(field, flag)`` pairs ``add_flags`` added.

    Returns:
      ``{field: value}`` for every flag that was given.
    """
    return {field: getattr(args, field) for field, _ in flags if hasattr(args, field)}


def add_arguments(parser: argparse.ArgumentParser, *, quick: str) -> None:
    """Adds the flags every experiment shares.

    Args:
      parser: the script's parser.
      quick: the help text of ``--quick``.

    ``--config``, ``--seeds``/``--seed``, ``--workdir``, ``--results``, ``--quick``,
    ``--progress``, ``--shard``, ``--force``, ``--report``, ``--out`` and ``--docs``.
    """
    parser.add_argument("--config", default=None, metavar="TOML",
                        help="settings from a TOML file of config fields (e.g. "
                             "experiments/configs/*.toml); flags given too override it")
    parser.add_argument("--seeds", type=parse_ints, default=None, help="e.g. 0,1,2")
    parser.add_argument("--seed", type=_TYPES["int"], default=None, help="a single seed")
    parser.add_argument("--workdir", default=None, help="checkpoints (not committed)")
    parser.add_argument("--results", default=None,
                        help="ledger root (default: results; --quick: WORKDIR/results)")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: the config's)")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="take every N-th run of the whole list from I (0-based; a fixed "
                             "split) and train those still to do")
    parser.add_argument("--force", action="store_true",
                        help="retrain (from scratch) runs whose record is current too")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: write the report of the ledger to --out")
    parser.add_argument("--out", default=None, help="report directory (default: workdir)")
    parser.add_argument("--docs", default=None, metavar="MARKDOWN",
                        help="with --report: also put the report between this page's "
                             "<name>-report markers and copy its figures beside it")


def base_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   name: str) -> dict[str, Any]:
    """Config overrides from the shared flags.

    Args:
      parser: the parser (bad combinations exit through ``parser.error``).
      args: its parsed arguments.
      name: the experiment's name, for the default workdir.

    Returns:
      ``seeds`` (from ``--seed``/``--seeds``), ``workdir`` (default ``runs/<name>``,
      ``runs/<name>_quick`` with ``--quick``), ``results`` (default ``results``,
      ``WORKDIR/results`` with ``--quick``: a smoke check never writes the committed
      ledger) and ``progress`` when given.
    """
    if args.shard is not None:
        try:
            ledger.shard([], args.shard)
        except ValueError as e:
            parser.error(str(e))
    if args.seed is not None and args.seeds is not None:
        parser.error("give --seed or --seeds, not both")
    if args.docs and not args.report:
        parser.error("--docs needs --report")
    out: dict[str, Any] = {}
    if args.seed is not None or args.seeds is not None:
        out["seeds"] = (args.seed,) if args.seed is not None else args.seeds
    if args.progress is not None:
        out["progress"] = args.progress
    out["workdir"] = args.workdir or f"runs/{name}{'_quick' if args.quick else ''}"
    out["results"] = args.results or (str(Path(out["workdir"]) / "results")
                                      if args.quick else "results")
    return out


def config_file(parser: argparse.ArgumentParser, args: argparse.Namespace,
                config_cls: type) -> dict[str, Any]:
    """The config fields set in ``--config FILE`` (TOML), minus those given as flags.

    Keys are the config dataclass's field names; lists become tuples; each value must
    have its field's type (an int is a float where a float is expected). A missing or
    malformed file, an unknown key or a wrong type ends the program through
    ``parser.error`` (one line naming the file and the key, exit status 2).

    Args:
      parser: the script's parser.
      args: its parsed arguments (``args.config`` the file, or None).
      config_cls: the experiment's config dataclass.

    Returns:
      ``{field: value}``: apply before the flags' overrides (flags win).
    """
    if not args.config:
        return {}
    import tomllib

    path = Path(args.config)
    try:
        settings = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        parser.error(f"--config {path}: cannot read it as TOML ({e})")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    out = {}
    for key, value in settings.items():
        if key not in fields:
            parser.error(f"--config {path}: unknown setting {key!r}; known: "
                         f"{', '.join(sorted(fields))}")
        try:
            out[key] = _typed(value, _annotation_text(fields[key].type))
        except TypeError as e:
            parser.error(f"--config {path}: {key} = {value!r}: {e}")
    given = {"seeds": args.seeds is not None or args.seed is not None,
             "workdir": args.workdir is not None, "results": args.results is not None,
             "progress": args.progress is not None}
    return {k: v for k, v in out.items() if not given.get(k, False)}


def _typed(value: Any, annotation: str) -> Any:
    """A TOML value as the config field's type (from its annotation text)."""
    for kind in (part.strip() for part in annotation.split("|")):  # TOML has no null
        if kind.startswith("tuple[") and isinstance(value, list):
            item = kind[len("tuple["):].split(",")[0].strip()
            return tuple(_typed(v, item) for v in value)
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind == "str" and isinstance(value, str):
            return value
    raise TypeError(f"expected {annotation}")


def make_config(parser: argparse.ArgumentParser, factory: Callable[..., Any],
                overrides: Mapping[str, Any]) -> Any:
    """``factory(**overrides)``; a value the config rejects is one line and exit 2.

    The config dataclasses validate their fields (distinct seeds, rates in range, known
    strategy names, ...) and raise ``ValueError`` / ``TypeError`` naming the field; on the
    command line that is a bad flag value, reported like argparse's own errors:
    ``<script>: error: <message>`` on stderr, exit status 2.

    Args:
      parser: the script's parser (its ``prog`` names the script).
      factory: the config class or a function such as ``quick_config``.
      overrides: the fields from flags and config files.

    Returns:
      The config.
    """
    try:
        return factory(**overrides)
    except (ValueError, TypeError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def parse_config(doc: str, config_cls: type, argv: Sequence[str] | None = None, *,
                 names: Mapping[str, str] | None = None) -> Any:
    """A script's whole command line -> its config dataclass, flags from the fields.

    ``script_parser(doc)`` with ``config_flags`` / ``add_flags`` of every field, parsed,
    then ``make_config``: a bad flag or value is one line on stderr and exit status 2.
    For evaluation scripts whose command line is just their config (the training
    experiments use ``make_parser`` / ``config_from_args``).

    Args:
      doc: the script's module docstring (help text).
      config_cls: the config dataclass.
      argv: the arguments (None: ``sys.argv[1:]``).
      names: field -> flag overrides, e.g. ``{"methods": "--fusion"}``.

    Returns:
      The config.
    """
    parser = script_parser(doc)
    flags = config_flags(config_cls, names=names)
    add_flags(parser, config_cls, flags)
    return make_config(parser, config_cls, flag_overrides(parser.parse_args(argv), flags))


def _file_only(experiment: type[Experiment]) -> str:
    """``--help``'s closing list: the config fields no flag sets (only ``--config``)."""
    flagged = {field for field, _ in experiment.flags} | {experiment.methods_field,
                                                            *_SHARED}
    descriptions = _field_help(experiment.config_class)
    rest = [f for f in dataclasses.fields(experiment.config_class) if f.name not in flagged]
    if not rest:
        return ""
    lines = [f"settings only a --config file sets ({experiment.config_class.__name__}):"]
    for f in rest:
        shown = "none" if _default(f) is None else flag_text(_default(f)) or "''"
        lines += textwrap.wrap(f"{f.name}: {descriptions.get(f.name, f.name)} "
                               f"(default: {shown})", 79, initial_indent="  ",
                               subsequent_indent="      ")
    return "\n".join(lines)


def make_parser(experiment: type[Experiment], *, doc: str, methods: str,
                quick: str) -> argparse.ArgumentParser:
    """An experiment script's parser: its method flag, the shared flags, its config's.

    Args:
      experiment: the ``Experiment`` subclass (``method_flag``, ``flags``,
        ``config_class``).
      doc: the script's docstring (its first line describes the script in ``--help``).
      methods: the help text of ``experiment.method_flag``.
      quick: the help text of ``--quick``.

    Returns:
      The parser (``script_parser``), with ``experiment.method_flag`` (comma-separated
      names), then ``add_arguments``'s flags, then ``add_flags``'s; ``--help`` ends with
      the config fields that have no flag.
    """
    parser = script_parser(doc, epilog=_file_only(experiment) or None)
    parser.add_argument(experiment.method_flag, default=None, help=methods)
    add_arguments(parser, quick=quick)
    add_flags(parser, experiment.config_class, experiment.flags)
    return parser


def config_from_args(experiment: type[Experiment], parser: argparse.ArgumentParser,
                     args: argparse.Namespace) -> Any:
    """The config a ``make_parser`` command line asks for.

    Later sources win: the shared flags (``base_overrides``), ``--config FILE``
    (``config_file``), the config's flags (``flag_overrides``), the method flag.
    ``--quick`` builds it with ``experiment.quick_config``. A value the config rejects
    ends the program as ``make_config`` says.

    Args:
      experiment: the ``Experiment`` subclass the parser was made for.
      parser: ``make_parser``'s parser.
      args: its parsed arguments.

    Returns:
      The config.
    """
    given = {**base_overrides(parser, args, experiment.name),
             **config_file(parser, args, experiment.config_class),
             **flag_overrides(args, experiment.flags)}
    methods = getattr(args, experiment.method_flag.lstrip("-").replace("-", "_"))
    if methods is not None:
        given[experiment.methods_field] = tuple(m for m in methods.split(",") if m)
    factory = experiment.quick_config if args.quick and experiment.quick_config else (
        experiment.config_class)
    return make_config(parser, factory, given)


def run_main(experiment: Experiment, args: argparse.Namespace) -> int:
    """What an experiment script's ``main`` does after parsing.

    Validates the methods, then trains what is missing and reports (or, with
    ``--report``, only reports and optionally updates ``--docs``), and prints the tables.
    A non-finite number never reaches a report: seed statistics and the JSON writer
    reject it with an error naming the value.

    Args:
      experiment: the experiment over the parsed config.
      args: the parsed arguments (``report``, ``docs``, ``out``, ``shard``, ``force``).

    Returns:
      The exit status: 0, or 2 for an unknown method (one line on stderr).
    """
    try:
        experiment.methods()
    except ValueError as e:
        print(f"{Path(experiment.script).name}: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    out = Path(args.out or experiment.config.workdir)
    if args.report:
        result = experiment.report(out)
        if args.docs:
            update_docs(experiment, out, args.docs)
    else:
        enable_compilation_cache(Path(experiment.config.workdir) / "jax_cache")
        result = experiment.run(shard=args.shard, force=args.force)
        if args.out:
            result = experiment.report(out)
    print()
    print((out / "results.md").read_text(), end="")
    print(f"\n{out / 'results.json'}  complete: {str(result['complete']).lower()}  "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


def run_script(main: Callable[[], int]) -> None:
    """What a training script does under ``if __name__ == "__main__":``.

    Tunes glibc's malloc for this process (freed step buffers are reused: faster steps;
    ``lepton_mm.training.tune_glibc_malloc``, docs/performance.md), then exits with
    ``main()``'s status. Tests call ``main`` itself, which leaves malloc alone.

    Args:
      main: the script's ``main`` (parses ``sys.argv``; returns the exit status).
    """
    from lepton_mm.training import tune_glibc_malloc

    tune_glibc_malloc()
    sys.exit(main())
