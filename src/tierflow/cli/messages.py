"""Error messages in the command line's terms.

The library's errors name its keywords, as a Python user would write them
(``pass nvme=DIR``, ``raise device_memory``, ``activations='offload'``); under the
``tierflow`` command the same advice must name the flags (``--nvme DIR``,
``--device-memory``, ``--activations offload``). :func:`for_cli` rewrites a message
for the flags of the command that ran, and leaves any other keyword alone, so the
library keeps one message per error and the CLI never points at a knob it lacks.
"""

from __future__ import annotations

import re


def for_cli(message: str, options) -> str:
    """``message`` with every keyword that is one of ``options`` (argparse destinations,
    e.g. ``vars(args)``) spelled as its flag: ``name=VALUE`` -> ``--name VALUE`` (quotes
    around VALUE dropped), and a bare ``snake_name`` -> ``--snake-name``."""
    names = sorted((name for name in options if re.fullmatch(r"[a-z][a-z0-9_]*", name)), key=len, reverse=True)
    if not names:
        return message
    words = "|".join(map(re.escape, names))

    def assignment(match: re.Match) -> str:
        value = match["quoted"] if match["quoted"] is not None else match["value"]
        return f"{_flag(match['name'])} {value}"

    message = re.sub(rf"(?<![\w./\\-])(?P<name>{words})=(?:(?P<q>['\"])(?P<quoted>[^'\"]*)(?P=q)|(?P<value>))",
                     assignment, message)
    # Bare keywords: only those with an underscore ("nvme", "device" are also plain words).
    snake = "|".join(re.escape(n) for n in names if "_" in n)
    if snake:
        message = re.sub(rf"(?<![\w./\\'\"-])({snake})(?![\w/\\'\"(-])", lambda m: _flag(m[1]), message)
    return message


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
