"""Generated blocks inside hand-written docs: a reproduction's summary where the docs discuss it.

A block sits between two markers::

    <!-- safespot-reproduce NAME BLOCK -->
    ...rendered from NAME's kept records by the sections of its spec's ``blocks.BLOCK``...
    <!-- end safespot-reproduce -->

:func:`write_blocks` renders every block of the docs afresh (``safespot-reproduce docs``);
:func:`check_blocks` lists the blocks whose text differs from what the records render, so a hand
edit of a generated number fails the check.
"""

from __future__ import annotations

import re
from pathlib import Path

from safespot.paths import PROJECT_ROOT
from safespot.reproduce.engine import kept_evaluations, not_kept, pending, render
from safespot.reproduce.sections import evaluations_read
from safespot.reproduce.spec import Spec, SpecError, load_spec

BLOCK = re.compile(
    r"(?P<open><!-- safespot-reproduce (?P<name>[\w.-]+) (?P<block>[\w.-]+) -->\n)"
    r"(?P<body>.*?)(?P<close><!-- end safespot-reproduce -->)",
    re.S,
)


def documents() -> list[Path]:
    """The markdown files that may hold generated blocks: README and docs/."""
    return [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]


def render_block(spec: Spec, block: str) -> str:
    blocks = spec.settings.get("blocks") or {}
    if block not in blocks:
        raise SpecError(f"{spec.name} has no block {block!r} (blocks: {sorted(blocks)})")
    waiting = f"Not measured yet: `safespot-reproduce run {spec.name}`, then `safespot-reproduce keep`.\n"
    if blocks[block] and all(part.get("kind") == "remeasured" for part in blocks[block]) and spec.records is not None:
        return render(spec, spec.records, tuple(blocks[block])).split("\n", 2)[2]  # history: "pending" rows
    if spec.records is None or not spec.records.is_dir():  # pending: nothing measured to show yet
        return waiting
    if pending(spec):  # kept in part (keep --partial): the block once its evaluations are all kept
        kept = kept_evaluations(spec)
        missing = [key for key in spec.evaluations if key not in kept]
        needed = set().union(*(evaluations_read(part) for part in blocks[block]))
        if needed & set(missing):
            shown = not_kept(spec)
            so_far = ", ".join(kept) or "no whole evaluation"
            held = f" Kept so far: {so_far}; not yet: {', '.join(shown)}." if kept or shown != missing else ""
            return waiting.rstrip("\n") + held + "\n"
    text = render(spec, spec.records, tuple(blocks[block]))
    return text.split("\n", 2)[2]  # without the report's title


def _rendered(text: str) -> str:
    specs: dict[str, Spec] = {}

    def replace(match: re.Match) -> str:
        name = match["name"]
        spec = specs.setdefault(name, load_spec(name))
        return match["open"] + render_block(spec, match["block"]) + match["close"]

    return BLOCK.sub(replace, text)


def check_blocks() -> list[str]:
    """The documents whose generated blocks differ from their records."""
    problems = []
    for path in documents():
        text = path.read_text()
        if BLOCK.search(text) and _rendered(text) != text:
            problems.append(f"{path.relative_to(PROJECT_ROOT)}: a generated block differs from its records")
    return problems


def write_blocks() -> list[Path]:
    """Render every generated block of the docs afresh; returns the files that changed."""
    changed = []
    for path in documents():
        text = path.read_text()
        new = _rendered(text)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed
