"""Command-line options generated from an estimator's own declarations.

An estimator states each parameter once: its constraint in
``_parameter_constraints``, its default in ``__init__``, its meaning in the
numpydoc ``Parameters`` section. The options of ``sparse-dict fit`` and
``sparse-dict demo`` are made from those three, so a new parameter appears on
the command line, with its type, its choices, its default and its help,
without being declared again here.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
from numbers import Integral

# Parameters that have no option of their own: a callable cannot be typed on
# a command line, ``verbose`` follows --quiet, ``device`` is the option
# the subcommands share with the extractor, and ``distributed`` follows
# ``fit --nproc``.
SKIPPED = ("verbose", "device", "distributed")

_NONE_WORDS = ("none", "None")


def generated_parameters(estimator_class):
    """Names of the constructor parameters that get an option, in signature order.

    Parameters
    ----------
    estimator_class : type
        A scikit-learn estimator class with ``_parameter_constraints``.

    Returns
    -------
    names : list of str

    Examples
    --------
    >>> from sparse_dict.estimator import SparseAutoencoderDictionary
    >>> names = generated_parameters(SparseAutoencoderDictionary)
    >>> names[0], "l1_coef" in names, "callback" in names, "verbose" in names
    ('n_components', True, False, False)
    """
    constraints = estimator_class._parameter_constraints
    names = []
    for name in inspect.signature(estimator_class.__init__).parameters:
        if name == "self" or name in SKIPPED:
            continue
        if any(c is callable for c in constraints.get(name, ())):
            continue
        names.append(name)
    return names


def parameter_docs(estimator_class):
    """The first paragraph of each parameter's numpydoc description, as plain text."""
    doc = inspect.cleandoc(estimator_class.__doc__ or "")
    match = re.search(r"^Parameters\n-+\n(.*?)(?=^\S[^\n]*\n-+\n|\Z)", doc, re.S | re.M)
    docs = {}
    if match is None:
        return docs
    name, lines = None, []
    for line in match.group(1).splitlines():
        header = re.match(r"^(\w+) :", line)
        if header:
            if name:
                docs[name] = _first_paragraph(lines)
            name, lines = header.group(1), []
        elif name:
            lines.append(line.strip())
    if name:
        docs[name] = _first_paragraph(lines)
    return docs


def _first_paragraph(lines):
    text = " ".join(lines).strip()
    text = text.split("  ")[0] if "  " in text else text
    # Terminal help has no markup: ``x`` and :class:`~a.b.C` become x and C.
    text = re.sub(r"``(.*?)``", r"\1", text)
    # A page of the docs is named by its file: :doc:`/scaling` -> docs/scaling.rst.
    text = re.sub(r":doc:`(?:[^`<]*<)?/?([\w/]+)>?`", r"docs/\1.rst", text)
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([^`]+)`", r"\1", text)
    return text


def _bounded(kind, interval, none_ok):
    noun = "an integer" if kind is int else "a number"
    low, high = interval.left, interval.right
    low_ok = "[" if interval.closed in ("left", "both") else "("
    high_ok = "]" if interval.closed in ("right", "both") else ")"
    parts = []
    if low is not None:
        parts.append(f"{'>=' if low_ok == '[' else '>'} {low}")
    if high is not None:
        parts.append(f"{'<=' if high_ok == ']' else '<'} {high}")
    bound = " and ".join(parts)
    expected = f"{noun}{' ' + bound if bound else ''}" + (" or 'none'" if none_ok else "")

    def parse(text):
        if none_ok and text in _NONE_WORDS:
            return None
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value != value or value in (float("inf"), float("-inf")) or (
            value not in interval
        ):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = noun.split()[-1]  # argparse names the type in some errors
    parse.expected = expected
    return parse


def _seed(text):
    if text in _NONE_WORDS:
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    # numpy's seeds: checked here, named by the option, rather than as
    # numpy's "Seed must be between 0 and 2**32 - 1" from deep inside.
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(
            f"expected an integer seed from 0 to 2**32 - 1, or 'none', got {text!r}"
        )
    return value


def _text_or_none(text):
    return None if text in _NONE_WORDS else text


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _npy_array(text):
    """An array-like parameter from the command line: the path of a .npy file, or none."""
    if text in _NONE_WORDS:
        return None
    import numpy as np

    text = os.path.expanduser(text)

    try:
        with open(text, "rb") as fh:
            magic = fh.read(6)
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"no file {text!r}") from None
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} ({exc.strerror})") from None
    if magic != b"\x93NUMPY":
        # np.load would call any other file a pickle, which misleads.
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a .npy file (as written by numpy.save)")
    try:
        # No pickles: an array file must not be able to run code.
        array = np.load(text, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r} as a .npy array ({exc})") from None
    # The array parameters (dict_init) are matrices: one row per atom.
    if array.ndim != 2:
        raise argparse.ArgumentTypeError(
            f"{text!r} holds an array of shape {array.shape}; expected 2 dimensions "
            "(one row per atom)")
    return array


def _union(interval_kind, interval, words, boolean, none_ok):
    """A parser for a parameter that takes several kinds of value (a number or a word)."""
    expected = []
    if interval is not None:
        expected.append(_bounded(interval_kind, interval, False).expected)
    if boolean:
        expected.append("true or false")
    expected += [repr(w) for w in sorted(words)] + (["'none'"] if none_ok else [])

    def parse(text):
        if none_ok and text in _NONE_WORDS:
            return None
        if text in words:
            return text
        if boolean and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        if interval is not None:
            try:
                return _bounded(interval_kind, interval, False)(text)
            except argparse.ArgumentTypeError:
                pass
        raise argparse.ArgumentTypeError(f"expected {' or '.join(expected)}, got {text!r}")

    return parse


def _option_kwargs(constraints):
    """argparse keyword arguments (type, choices, action, metavar) for one parameter."""
    from sklearn.utils._param_validation import Interval, StrOptions

    none_ok = None in constraints
    intervals = [c for c in constraints if isinstance(c, Interval)]
    words = set().union(*(c.options for c in constraints if isinstance(c, StrOptions)))
    boolean = "boolean" in constraints
    if "random_state" in constraints:
        return {"type": _seed, "metavar": "SEED"}
    if "array-like" in constraints:
        return {"type": _npy_array, "metavar": "FILE.npy"}
    if boolean and not (intervals or words or none_ok):
        return {"action": argparse.BooleanOptionalAction}
    if intervals and not (words or boolean):
        kind = int if intervals[0].type is Integral else float
        return {"type": _bounded(kind, intervals[0], none_ok), "metavar": kind.__name__.upper()}
    if words and not (intervals or boolean):
        choices = sorted(words)
        return {"choices": choices + (["none"] if none_ok else []),
                "type": _text_or_none if none_ok else str}
    if intervals or words or boolean:
        # Several kinds at once, such as a number or "auto", or a boolean or "auto".
        interval = intervals[0] if intervals else None
        kind = int if interval is not None and interval.type is Integral else float
        parts = ([kind.__name__.upper()] if interval is not None else []) + (
            ["true", "false"] if boolean else []) + sorted(words)
        return {"type": _union(kind, interval, words, boolean, none_ok),
                "metavar": "{" + ",".join(parts) + "}"}
    # A plain string, or a constraint this generator does not know: the text
    # is passed on, and the estimator's own validation judges it.
    return {"type": _text_or_none if none_ok else str}


def add_estimator_options(group, estimator_class, defaults=None):
    """Add one option per generated parameter of ``estimator_class`` to ``group``.

    Parameters
    ----------
    group : argparse.ArgumentParser or argument group
    estimator_class : type
    defaults : dict, default=None
        Defaults that replace the estimator's own for this subcommand (the
        demo's sizes, a seed); every default is shown in ``--help``.
    """
    defaults = defaults or {}
    constraints = estimator_class._parameter_constraints
    signature = inspect.signature(estimator_class.__init__).parameters
    docs = parameter_docs(estimator_class)
    for name in generated_parameters(estimator_class):
        default = defaults.get(name, signature[name].default)
        kwargs = _option_kwargs(constraints.get(name, []))
        help_text = docs.get(name, "").rstrip(".") or name.replace("_", " ")
        # argparse fills in %(default)s (and then adds no default of its own
        # to --flag/--no-flag options); a literal % is doubled.
        help_text = help_text.replace("%", "%%") + " (default: %(default)s)"
        flag = "--" + name.replace("_", "-")
        group.add_argument(flag, dest=name, default=default, help=help_text, **kwargs)


def estimator_params(args, estimator_class):
    """The generated parameters' values in parsed ``args``, by name."""
    return {name: getattr(args, name) for name in generated_parameters(estimator_class)
            if hasattr(args, name)}
