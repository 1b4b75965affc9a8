"""Command lines that mix options and dotted config overrides in any order.

    sparsepo train --resume auto method.beta=0.1 --nproc 2 train.max_steps=20

argparse gives a `nargs="*"` positional only the tokens before the first option; the rest come back
as unknown arguments. Those that look like `section.key=value` (or `--section.key=value`) are
overrides, appended in command-line order (a later one wins); anything else is still refused,
naming the token.
"""

from __future__ import annotations

import argparse
import re
import typing

OVERRIDE = re.compile(r"^(--)?[A-Za-z_]\w*\.[A-Za-z_]\w*=")
"""What an override token looks like: section.key=value (parse_override checks the rest)."""


def is_override(token: str) -> bool:
    return bool(OVERRIDE.match(token))


def parse_with_overrides(parser: argparse.ArgumentParser,
                         argv: typing.Sequence[str] | None = None) -> argparse.Namespace:
    """parser.parse_args, but `section.key=value` tokens may stand anywhere; they end up in
    `args.overrides` (for commands that take overrides). Unknown options are an error (exit 2)."""
    args, extras = parser.parse_known_args(argv)
    takes_overrides = isinstance(getattr(args, "overrides", None), list)
    late = [t for t in extras if takes_overrides and is_override(t)]
    unknown = [t for t in extras if t not in late]
    if unknown:
        hint = " (config overrides look like section.key=value, e.g. method.beta=0.05)" if takes_overrides else ""
        parser.exit(2, f"{parser.prog}: error: unrecognized arguments: {' '.join(unknown)}{hint}\n")
    if takes_overrides:
        args.overrides = [*args.overrides, *(t.removeprefix("--") for t in late)]
    return args
