"""Every config key with its type, default and documentation, read from the dataclasses themselves
(`sparsepo config keys`). The field docstrings are the string literals under each field; Python
drops them at runtime, so they are read from the class's source."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing

from sparsepo.config.sections import _CHOICES, RunConfig


def field_docs(cls: type) -> dict[str, str]:
    """field name -> the docstring written under it in `cls`'s body, or in the body of the base that
    declares it (a method's knob mixins, `losses/knobs.py`); '' when there is none."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):  # the bases first, so a subclass's own docstring wins
        docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = ""
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                doc = " ".join(nxt.value.value.split())
            docs[node.target.id] = doc
    return docs


def _type_name(tp: typing.Any) -> str:
    return tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> typing.Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def _rows(cls: type, section: str) -> list[str]:
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if section == "method" and f.name == "params":
            continue
        default = _default(f)
        line = f"  {section}.{f.name}: {_type_name(f.type)} = {list(default) if isinstance(default, tuple) else default!r}"
        choices = _CHOICES.get((section, f.name))
        if choices:
            line += f"  [{' | '.join(choices)}]"
        out.append(line)
        if docs.get(f.name):
            out.extend(textwrap.wrap(docs[f.name], 100, initial_indent="      ", subsequent_indent="      "))
    return out


def describe_keys() -> str:
    """The text of `sparsepo config keys`: one block per section, method parameters per method."""
    from sparsepo.losses import METHODS

    hints = typing.get_type_hints(RunConfig)
    lines = []
    for f in dataclasses.fields(RunConfig):
        cls = hints[f.name]
        lines.append(f"{f.name}:" + ("  (method.name picks a loss; its parameters sit beside it)"
                                     if f.name == "method" else ""))
        lines.extend(_rows(cls, f.name))
        if f.name == "method":
            for name, spec in METHODS.items():
                lines.append(f"  with method.name={name}:")
                lines.extend("  " + row for row in _rows(spec.params_cls, "method"))
        lines.append("")
    return "\n".join(lines)
