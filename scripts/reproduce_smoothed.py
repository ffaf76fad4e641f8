"""Reduced-scale reproduction of paper 002's smoothed rows on CIFAR-10 (l_2, eps = delta = 0.5).

Table 5 (empirical): a Gaussian-trained model (``experiment=cifar10_gaussian scale=reduced
method.sigma=0.1``), smoothed with sigma 0.1; the original images (None) and their S-Full
robustification on the soft smoothed classifier (5 draws per step, ``smoothing.m_robustify``) are
attacked with randomised PGD-20 and its 10-restart version (50 draws, ``smoothing.m_attack``),
grey box and white box (reconstruction first), every point scored by the vote over 50 draws:
``evaluation=[preempt_smooth_none,preempt_smooth_sfull]``.

Table 7 (certified): a model trained with sigma 0.25, smoothed with sigma 0.25; Cohen et al.'s
CERTIFY (n0 100, ``--n-certify`` draws, alpha 0.001) on the originals and on the robustified
images: ``evaluation=[preempt_certify_none,preempt_certify_sfull]``. With n draws no radius above
``sigma * Phi^-1(alpha^(1/n))`` can be certified; the report states it.

Each table is one evaluation run, so None and S-Full are on the same seeded test images and their
differences are paired (McNemar). The report gives every accuracy with a 95% Wilson interval,
the published rows, a verdict per claim, every command and its wall time. ``--robustifier
sfull_fast`` (early exit with compaction) replaces the paper's fixed schedule where it would
not fit; the report says which.

A table too long for one sitting runs in pieces of its test images: ``--override
data.test_part=[k,K]`` for k = 0..K-1 (each piece reusing the trained model with ``--reuse``), then
``--reuse-eval TABLE=DIR0,DIR1,...`` joins the pieces' records into one report.

Usage::

    python scripts/reproduce_smoothed.py [--tables 5,7] [--test-images 200] [--n-certify 10000]
        [--robustifier sfull|sfull_fast] [--docs docs/FILE.md] [--reuse RUN=DIR] [--reuse-eval TABLE=DIR[,DIR...]]
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

import pandas as pd
from scipy.stats import norm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from safespot.reproduce import (  # noqa: E402
    check_evaluations,
    checkpoint_in,
    commands_section,
    evaluation_parts,
    new_output_dir,
    parse_pairs,
    read_records,
    reused_command,
    run_logged,
    write_report,
)
from safespot.stats import SMALLEST_EFFECT, accuracy, paired_difference, verdict  # noqa: E402
from safespot.utils.tables import markdown_table  # noqa: E402

PAPER_SCHEDULES = ("sfull", "sfull_paper")  # conf/robustifier options with the paper's fixed schedule (no early exit)
ALPHA = 0.001  # CERTIFY's failure probability (conf/evaluation/preempt_certify_*.yaml)
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
# table -> (training run name, sigma, the two evaluations None / S-Full)
TABLES = {
    "5": ("reduced_cifar10_gaussian_0.1", 0.1, ("preempt_smooth_none", "preempt_smooth_sfull")),
    "7": ("reduced_cifar10_gaussian_0.25", 0.25, ("preempt_certify_none", "preempt_certify_sfull")),
}
EMPIRICAL = {"Clean": "/correct", "Grey PGD": "_pgd/correct", "Grey PGD-10": "_pgd10/correct"}
EMPIRICAL |= {"White PGD": "_white_pgd/correct", "White PGD-10": "_white_pgd10/correct"}
PUBLISHED_5 = """| Preempt. | Clean | Grey PGD | Grey PGD-10 | White PGD | White PGD-10 |
|---|---:|---:|---:|---:|---:|
| None | 92.14 | 56.02 | 53.01 | 56.02 | 53.01 |
| Ours | 92.35 | 91.37 | 89.98 | 82.06 | 80.71 |
"""
PUBLISHED_7 = """| Preempt. | Clean | Cert. (r = 0.5) |
|---|---:|---:|
| None | 82.84 | 55.58 |
| Ours | 84.72 | 77.95 |
"""


def _verdict(diff):
    """The claim's verdict with the smallest effect of interest (1 pp)."""
    return verdict(diff, smallest=SMALLEST_EFFECT)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", default="5,7", help="which tables: 5, 7 or 5,7")
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-certify", type=int, default=10_000, help="CERTIFY's n (paper: 100,000)")
    parser.add_argument("--robustifier", default="sfull", help="conf/robustifier of S-Full (paper: sfull)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--docs", type=Path)
    parser.add_argument("--reuse", action="append", default=[], metavar="RUN=DIR")
    parser.add_argument("--reuse-eval", action="append", default=[], metavar="TABLE=EVAL_DIR")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="evaluate.py override")
    args = parser.parse_args(argv)
    args.tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    if not args.tables or set(args.tables) - set(TABLES):
        parser.error(f"--tables takes 5, 7 or 5,7, got {args.tables}")
    if args.test_images < 1 or args.n_certify < 1:
        parser.error("--test-images and --n-certify must be >= 1")
    if not (ROOT / "conf" / "robustifier" / f"{args.robustifier}.yaml").is_file():
        parser.error(f"--robustifier {args.robustifier!r} is not in conf/robustifier")
    args.reuse = parse_pairs(parser, args.reuse, "--reuse", [TABLES[t][0] for t in args.tables])
    args.reuse_eval = parse_pairs(parser, args.reuse_eval, "--reuse-eval", args.tables)
    for run_dir in args.reuse.values():
        checkpoint_in(Path(run_dir), "best")
    check_evaluations(parser, args.reuse_eval, "--reuse-eval", "records.csv")
    return args


def evaluation_overrides(table: str, args: argparse.Namespace) -> list[str]:
    """The evaluate.py overrides of a table (besides the checkpoint and the run directory)."""
    _, sigma, (none, sfull) = TABLES[table]
    overrides = [
        "threat=l2_0.5",
        f"smoothing.sigma={sigma}",
        f"evaluation=[{none},{sfull}]",
        f"robustifier@evaluation.{sfull}.robustifier={args.robustifier}",
        f"data.test_subset={args.test_images}",
        f"seed={args.seed}",
    ]
    if table == "7":
        overrides += [f"evaluation.{key}.certify.n={args.n_certify}" for key in (none, sfull)]
    return overrides + list(args.override)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = new_output_dir("reproduce_smoothed", args.out)
    py, commands, evals = sys.executable, [], {}
    for table in args.tables:
        run, sigma, _ = TABLES[table]
        if table in args.reuse_eval:
            commands += [reused_command(d, "evaluate.py") for d in evaluation_parts(args.reuse_eval[table])]
            evals[table] = Path(args.reuse_eval[table])
            continue
        train_dir = Path(args.reuse[run]) if run in args.reuse else out / "train" / run
        if run in args.reuse:
            commands.append(reused_command(train_dir, "train.py"))
        else:
            train = ["experiment=cifar10_gaussian", "scale=reduced", f"method.sigma={sigma}", f"seed={args.seed}"]
            run_logged([py, "train.py", *train, f"hydra.run.dir={train_dir}"], commands)
        evals[table] = out / "eval" / f"table{table}"
        overrides = [f"ckpt_path={checkpoint_in(train_dir, 'best')}", *evaluation_overrides(table, args)]
        run_logged([py, "evaluate.py", *overrides, f"hydra.run.dir={evals[table]}"], commands)
    write_report(out, render(evals, commands, args), args.docs)
    return 0


def _flags(records: pd.DataFrame, field: str) -> pd.Series | None:
    return records[field].astype(bool) if field in records else None


def _claim(records: pd.DataFrame, sfull_field: str, none_field: str, text: str) -> tuple[str, str, str] | None:
    a, b = _flags(records, sfull_field), _flags(records, none_field)
    if a is None or b is None:
        return None
    diff = paired_difference(a.to_numpy(), b.to_numpy())
    return text, diff.percent(), _verdict(diff)


def table5(records: pd.DataFrame) -> list[str]:
    none, sfull = TABLES["5"][2]
    rows = []
    for key, label in ((none, "None"), (sfull, "Ours (S-Full)")):
        row = {"Preempt.": label}
        for column, suffix in EMPIRICAL.items():
            if key == none:  # no robustification: the white-box adversary is the grey-box one (footnote 2)
                suffix = suffix.replace("_white", "")
            flags = _flags(records, f"{key}{suffix}")
            row[column] = accuracy(flags).percent() if flags is not None else "–"
        rows.append(row)
    published = {"Grey PGD": 35.35, "Grey PGD-10": 36.97, "White PGD": 26.04, "White PGD-10": 27.70}
    claims = []
    for column, gain in published.items():
        suffix = EMPIRICAL[column]
        # the None row has no white box: its grey-box attack is the white-box one (paper 002, footnote 2)
        none_suffix = suffix.replace("_white", "")
        text = f"{column} accuracy, Ours minus None (paper: +{gain:.2f})"
        claim = _claim(records, f"{sfull}{suffix}", f"{none}{none_suffix}", text)
        if claim:
            claims.append(claim)
    return _section(
        "Table 5: empirical accuracy of the smoothed network (sigma 0.1)",
        ["The None row's white-box cells are its grey-box ones (paper 002, footnote 2: nothing was modified).", ""],
        rows,
        "Published (paper 002, Table 5, WRN-34-10 trained with Gaussian noise, full test set):",
        PUBLISHED_5,
        claims,
    )


def _section(title: str, notes: list[str], rows: list[dict], source: str, published: str, claims: list) -> list[str]:
    """A table's report section: measured rows, the published ones, the claims with verdicts."""
    columns = ["Claim (same images)", "Difference [95% CI]", "Verdict"]
    return [
        f"## {title}",
        "",
        *notes,
        markdown_table(pd.DataFrame(rows)),
        source,
        "",
        published,
        markdown_table(pd.DataFrame(claims, columns=columns)) if claims else "",
    ]


def max_certifiable_radius(sigma: float, n: int, alpha: float = ALPHA) -> float:
    """The largest radius CERTIFY can return with ``n`` draws: every draw votes for the class,
    so the one-sided Clopper-Pearson bound is ``alpha^(1/n)``, radius ``sigma Phi^-1(that)``."""
    return float(sigma * norm.ppf(alpha ** (1 / n)))


def table7(records: pd.DataFrame, n: int) -> list[str]:
    none, sfull = TABLES["7"][2]
    rows = []
    for key, label in ((none, "None"), (sfull, "Ours (S-Full)")):
        row = {"Preempt.": label, "Clean": accuracy(records[f"{key}/correct"].astype(bool)).percent()}
        for r in RADII:
            flags = _flags(records, f"{key}_certify/cert_{r:g}")
            row[f"r = {r:g}"] = accuracy(flags).percent() if flags is not None else "–"
        rows.append(row)
    sigma = TABLES["7"][1]
    bound = max_certifiable_radius(sigma, n)
    certified = _claim(
        records,
        f"{sfull}_certify/cert_0.5",
        f"{none}_certify/cert_0.5",
        "certified accuracy at r = 0.5, Ours minus None (paper: +22.37)",
    )
    if certified and bound < 0.5:  # neither row can certify r = 0.5 with this n: nothing to compare
        certified = (certified[0], certified[1], f"not measurable at n = {n:,} (largest radius {bound:.3f})")
    clean = _claim(records, f"{sfull}/correct", f"{none}/correct", "clean accuracy, Ours minus None (paper: +1.88)")
    claims = [c for c in (certified, clean) if c]
    note = (
        f"CERTIFY with n0 = 100, n = {n:,}, alpha = {ALPHA}: no radius above "
        f"sigma Phi^-1(alpha^(1/n)) = {bound:.3f} can be certified "
        f'(paper: n = 100,000, up to {max_certifiable_radius(sigma, 100_000):.3f}). "Clean" is the accuracy '
        f"of the smoothed vote over `smoothing.n_vote` draws on the (robustified) images; r = 0 is CERTIFY's "
        "(abstentions count as wrong)."
    )
    return _section(
        "Table 7: certified accuracy of the smoothed network (sigma 0.25)",
        [note, ""],
        rows,
        "Published (paper 002, Table 7 left; the certified column at the threat model's eps = 0.5):",
        PUBLISHED_7,
        claims,
    )


def render(evals: dict[str, Path], commands: list[str], args: argparse.Namespace) -> str:
    records = {t: read_records(d) for t, d in evals.items()}
    schedule = (
        "the paper's fixed schedule (MAXITER 100, T 20)"
        if args.robustifier in PAPER_SCHEDULES
        else f"`robustifier={args.robustifier}` (not the paper's fixed schedule)"
    )
    lines = [
        "# Paper 002, smoothed networks (Tables 5 and 7), reduced",
        "",
        f"Generated {datetime.now():%Y-%m-%d %H:%M} by `python scripts/reproduce_smoothed.py`; "
        f"{len(next(iter(records.values())))} seeded CIFAR-10 test images, seed {args.seed}; l_2 "
        f"eps = delta = 0.5; S-Full with {schedule}, beta 0.005, on the soft smoothed classifier. "
        "Models: `experiment=cifar10_gaussian scale=reduced` (small CNN, width 16, Gaussian noise "
        "augmentation, 20,000 training images, 8 epochs). Accuracy in %, 95% Wilson intervals; "
        "differences paired on the same images (McNemar p).",
        "",
    ]
    if "5" in records:
        lines += table5(records["5"])
    if "7" in records:
        lines += table7(records["7"], args.n_certify)
    return "\n".join([*lines, "", *commands_section(commands)])


if __name__ == "__main__":
    raise SystemExit(main())
