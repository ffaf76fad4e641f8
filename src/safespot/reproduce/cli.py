"""``safespot-reproduce``: run, keep, render and check the reproductions of ``conf/reproduce/``.

safespot-reproduce list                         # the reproductions and their kept reports
safespot-reproduce run NAME [--out DIR] [--only KEY[/k]] [--set key=value]
                                                # run what is missing into DIR (a new directory under
                                                # $LOG_DIR/reproduce/NAME/ by default; an existing DIR
                                                # continues a stopped reproduction), render DIR/report.md
safespot-reproduce adopt NAME KEY RUN_DIR --out DIR
                                                # take an earlier train.py run (or a run another
                                                # reproduction keeps, docs/records/<name>/train/<run>)
                                                # with the settings of the spec's run KEY as that run of
                                                # DIR (copied, not retrained)
safespot-reproduce adopt NAME KEY docs/records/<name>/eval/<evaluation> --out DIR
                                                # the same evaluation (same overrides, same weights, same
                                                # pieces) another reproduction ran, as evaluation KEY
safespot-reproduce keep NAME DIR [--replace]    # DIR's records into the spec's records, its report into docs/
safespot-reproduce keep NAME DIR --partial      # what DIR has finished (its report stays a pending stub)
safespot-reproduce keep NAME DIR --only KEY     # add evaluation KEY of DIR to the kept records
safespot-reproduce keep NAME DIR --only KEY --partial   # the pieces of KEY that DIR finished (run skips kept pieces)
safespot-reproduce render NAME [--records DIR]  # print the report rendered from records (default: the kept ones)
safespot-reproduce check [NAME ...]             # every kept report and generated block equals its records' rendering
                                                # (a stub report marked pending, without records, is listed as pending)
safespot-reproduce docs                         # render the generated blocks of README and docs/ afresh
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from safespot.errors import ConfigError
from safespot.paths import PROJECT_ROOT, fresh_directory
from safespot.reproduce.blocks import check_blocks, write_blocks
from safespot.reproduce.engine import (
    adopt,
    adopt_evaluation,
    check_spec,
    keep,
    keep_evaluations,
    kept_evaluations,
    not_kept,
    pending,
    render,
    run_spec,
    shown_path,
)
from safespot.reproduce.resume import unfinished
from safespot.reproduce.spec import load_spec, spec_names


def _out(name: str, given: Path | None) -> Path:
    if given is not None:
        return given
    root = Path(os.environ.get("LOG_DIR", PROJECT_ROOT / "logs")) / "reproduce" / name
    return fresh_directory(root, f"{datetime.now():%Y-%m-%d_%H-%M-%S}")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="safespot-reproduce", description=__doc__.splitlines()[0])
    verbs = main.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", help="the reproductions")
    run = verbs.add_parser("run", help="run what a reproduction misses and render its report")
    run.add_argument("name")
    run.add_argument("--out", type=Path, help="the reproduction's directory (an existing one continues)")
    run.add_argument("--only", action="append", default=[], metavar="KEY[/k]", help="only this evaluation (piece)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change the spec")
    adopted = verbs.add_parser("adopt", help="take an earlier training run or evaluation as one of a reproduction's")
    adopted.add_argument("name")
    adopted.add_argument("key", help="the spec's training run, or its evaluation when RUN_DIR is <root>/eval/<name>")
    adopted.add_argument(
        "run_dir", type=Path, help="a finished train.py run directory, or a kept run / evaluation of a reproduction"
    )
    adopted.add_argument("--out", type=Path, required=True, help="the reproduction's directory")
    kept = verbs.add_parser("keep", help="keep a finished reproduction's records and report")
    kept.add_argument("name")
    kept.add_argument("out", type=Path)
    kept.add_argument("--replace", action="store_true", help="replace existing kept records")
    kept.add_argument("--partial", action="store_true", help="keep what DIR has finished; the report stays a stub")
    kept.add_argument(
        "--only", action="append", default=[], metavar="KEY", help="add only this evaluation to the kept records"
    )
    shown = verbs.add_parser("render", help="print the report rendered from records")
    shown.add_argument("name")
    shown.add_argument("--records", type=Path, help="a reproduction's directory (default: the kept records)")
    check = verbs.add_parser("check", help="kept reports and generated blocks equal their records' rendering")
    check.add_argument("names", nargs="*")
    verbs.add_parser("docs", help="render the docs' generated blocks afresh")
    return main


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    for name in ("out", "run_dir", "records"):  # the caller's directory: the commands run in the checkout
        if getattr(args, name, None) is not None:
            setattr(args, name, getattr(args, name).absolute())
    if args.verb == "list":
        for name in spec_names():
            spec = load_spec(name)
            report = spec.report.relative_to(PROJECT_ROOT) if spec.report else "-"
            print(f"{name:24s} {report}    {spec.title}")
        return 0
    if args.verb == "run":
        spec = load_spec(args.name, args.set)
        run_spec(spec, _out(args.name, args.out), args.only)
        return 0
    if args.verb == "adopt":
        evaluation = "eval" in args.run_dir.parts[-3:-1]  # <root>/eval/<name> (or a piece of it: refused)
        taken = adopt_evaluation if evaluation else adopt
        target = taken(load_spec(args.name), args.key, args.run_dir, args.out)
        print(f"adopted: {args.run_dir} as {target}")
        return 0
    if args.verb == "keep":
        if args.only and args.replace:
            raise ConfigError("keep --only adds evaluations to the kept records: without --replace")
        spec = load_spec(args.name)
        target = (
            keep_evaluations(spec, args.out, args.only, args.partial)
            if args.only
            else keep(spec, args.out, args.replace, args.partial)
        )
        print(f"kept: {shown_path(target)}")
        return 0
    if args.verb == "render":
        spec = load_spec(args.name)
        root = args.records or spec.records
        if root is None:
            raise ConfigError(f"{args.name} keeps no records; give --records DIR")
        sys.stdout.write(render(spec, root))
        return 0
    if args.verb == "check":
        names = args.names or spec_names()
        specs = [load_spec(name) for name in names]
        problems = [p for spec in specs for p in check_spec(spec)]
        if not args.names:
            problems += check_blocks()
        for problem in problems:
            print(problem)
        waiting = [spec for spec in specs if pending(spec)]
        for spec in waiting:
            kept = kept_evaluations(spec)
            shown = not_kept(spec)
            held = f"records kept for {', '.join(kept) or 'no whole evaluation'}; not for {', '.join(shown)}"
            trained = spec.records is not None and (spec.records / "train").is_dir()
            if not kept and all(key in spec.evaluations for key in shown):  # not even a piece
                held = "trainings kept, no evaluation yet" if trained else "no kept records yet"
            for run, progress in unfinished(spec.records).items():
                held += f"; training {run} kept unfinished at epoch {progress['epochs']} of {progress['max_epochs']}"
            print(f"{spec.name}: pending ({held}; {shown_path(spec.report)} is a stub)")
        print(f"{len(names)} reproductions checked: " + ("every report equals its records" if not problems else
              f"{len(problems)} differ") + (f" ({len(waiting)} pending)" if waiting else ""))  # fmt: skip
        return 1 if problems else 0
    changed = write_blocks()
    print("\n".join(str(p.relative_to(PROJECT_ROOT)) for p in changed) or "no generated block changed")
    return 0
