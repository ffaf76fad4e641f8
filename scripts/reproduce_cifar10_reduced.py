"""Reduced-scale reproduction of the CIFAR-10 tables of papers 000 (Table 1) and 002 (Tables 1-2).

``--norm linf`` (default; eps = delta = 8/255): paper 000 Table 1 left and paper 002 Table 1.
``--norm l2`` (eps = delta = 0.5): paper 000 Table 1 right and paper 002 Table 2. ``--models``
picks the rows: ``natural``, ``preemptive`` (paper 002's "Ours"), ``adv``, ``sfgsm_adv`` and
``spgd_adv`` (paper 000's safe-spot-aware S-FGSM+ADV / S-PGD+ADV); default the first three.

Trains the reduced models (``experiment=cifar10_<model>_<norm> scale=reduced``; the natural model
is ``cifar10_natural`` for both norms, evaluated under the chosen threat model),
runs the robustification grid on each (None, S-FGSM, S-PGD, S-Full; grey-box PGD-20 and
AutoAttack; the adaptive white-box attack on S-Full), and writes one markdown report holding
the measured tables next to the papers' published numbers, with the exact commands and seeds.

Everything goes into a fresh directory (default ``$LOG_DIR/reproduce_cifar10_reduced/<time>``);
nothing existing is overwritten. ``--reuse PRESET=RUN_DIR`` evaluates an earlier training run of
the same preset instead of training again.

Usage::

    python scripts/reproduce_cifar10_reduced.py [--norm linf|l2] [--models natural,preemptive,adv]
        [--test-images 200] [--seed 0] [--docs docs/FILE.md] [--reuse RUN=DIR] [--reuse-eval RUN=DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import pandas as pd  # noqa: E402

from safespot.report import PREEMPTIONS, load_run, preemptive_table, safe_spot_table, to_markdown  # noqa: E402
from safespot.reproduce import check_evaluations, checkpoint_in, new_output_dir, parse_pairs, run_logged, write_report  # noqa: E402
from safespot.stats import SMALLEST_EFFECT, accuracy, paired_difference, verdict  # noqa: E402
from safespot.utils.tables import markdown_table  # noqa: E402

# model -> (checkpoint the papers evaluate, row label); run name reduced_cifar10_<model>[_<norm>]
KINDS = {
    "natural": ("best", "Natural"),
    "preemptive": ("last", "Ours (preemptive)"),  # paper 002 keeps the last one
    "adv": ("best", "ADV"),  # best robust checkpoint (Rice et al.)
    "sfgsm_adv": ("best", "S-FGSM+ADV"),  # paper 000's safe-spot-aware training, FGSM safe-spot step
    "spgd_adv": ("best", "S-PGD+ADV"),  # ... PGD-10 safe-spot step
}
NORMS = {"linf": ("l_inf", "8/255", []), "l2": ("l_2", "0.5", ["threat=l2_0.5"])}
DEFAULT_MODELS = "natural,preemptive,adv"


def _verdict(diff):
    """The claim's verdict with the smallest effect of interest (1 pp)."""
    return verdict(diff, smallest=SMALLEST_EFFECT)


def run_name(kind: str, norm: str) -> str:
    """``reduced_<preset>``: the run of ``experiment=<preset> scale=reduced``."""
    return "reduced_cifar10_natural" if kind == "natural" else f"reduced_cifar10_{kind}_{norm}"


def models(norm: str, kinds: list[str]) -> dict[str, tuple[str, str]]:
    """Run name -> (checkpoint, label) of the chosen rows, in the order given."""
    return {run_name(kind, norm): KINDS[kind] for kind in kinds}


def label_of(run: str) -> str:
    """The row label of a run directory named ``reduced_cifar10_<model>[_<norm>]``."""
    kind = run.removeprefix("reduced_cifar10_")
    for norm in NORMS:
        kind = kind.removesuffix(f"_{norm}")
    return KINDS[kind][1]


GRID = "[clean,preempt_none,preempt_sfgsm,preempt_spgd,preempt_sfull]"

PAPER_000 = {
    "linf": """| Model | None | S-FGSM | S-PGD | S-Full |
|---|---|---|---|---|
| Natural | 95.97 / 0.00 | 82.40 / 0.00 | 95.97 / 0.00 | 95.48 / 9.67 |
| ADV | 86.51 / 47.21 | 86.51 / 77.08 | 86.51 / 71.22 | 86.51 / 85.06 |
| S-FGSM+ADV | 86.83 / 42.50 | 86.83 / 78.23 | 86.83 / 69.25 | 86.83 / 85.35 |
| S-PGD+ADV | 91.32 / 39.33 | 91.32 / 77.01 | 91.32 / 63.94 | 91.32 / 89.84 |
""",
    "l2": """| Model | None | S-FGSM | S-PGD | S-Full |
|---|---|---|---|---|
| Natural | 95.97 / 0.53 | 94.61 / 0.79 | 95.97 / 0.38 | 95.94 / 59.00 |
| ADV | 90.26 / 68.16 | 90.26 / 88.82 | 90.26 / 86.28 | 90.26 / 89.99 |
| S-FGSM+ADV | 90.92 / 63.27 | 90.92 / 88.82 | 90.92 / 84.92 | 90.92 / 90.60 |
| S-PGD+ADV | 94.10 / 57.70 | 94.10 / 88.03 | 94.10 / 80.94 | 94.10 / 93.54 |
""",
}
PAPER_002 = {
    "linf": """| Model | Preempt. | Clean | Grey PGD | Grey AA | White PGD | White AA |
|---|---|---:|---:|---:|---:|---:|
| ADV | None | 86.72 | 54.59 | 51.68 | 54.59 | 51.68 |
| ADV | Ours | 86.72 | – | 81.70 | 86.72 | 86.72 |
| Ours | Ours | 88.54 | – | 82.88 | 88.54 | 88.54 |
""",
    "l2": """| Model | Preempt. | Clean | Grey PGD | Grey AA | White PGD | White AA |
|---|---|---:|---:|---:|---:|---:|
| ADV | None | 90.85 | 71.90 | 71.21 | 71.90 | 71.21 |
| ADV | Ours | 90.85 | 84.81 | 83.56 | 85.12 | 79.48 |
| Ours | Ours | 92.57 | 91.81 | 89.32 | 85.02 | 80.79 |
""",
}
PAPER_002_TABLE = {"linf": "Table 1", "l2": "Table 2"}
# paper 000, Table 1: (clean, grey-box PGD under S-Full) of the rows the claims compare
PAPER_000_ROWS = {
    "linf": {"ADV": (86.51, 85.06), "S-FGSM+ADV": (86.83, 85.35), "S-PGD+ADV": (91.32, 89.84)},
    "l2": {"ADV": (90.26, 89.99), "S-FGSM+ADV": (90.92, 90.60), "S-PGD+ADV": (94.10, 93.54)},
}
# the published grey-box PGD accuracy under S-Full of the preemptive model and of ADV (paper 002)
# (l_inf: the extraction lost the grey-box PGD cells of the robustified rows; 82.88 / 81.70 are grey-box AA)
PAPER_002_OURS_VS_ADV = {"linf": "grey-box AA 82.88 vs 81.70", "l2": "91.81 vs 84.81"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-images", type=int, default=200, help="seeded CIFAR-10 test subset (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--norm", default="linf", choices=sorted(NORMS), help="threat model (eps = delta)")
    parser.add_argument(
        "--models",
        default=DEFAULT_MODELS,
        help=f"rows, comma-separated, from {', '.join(KINDS)} (default {DEFAULT_MODELS})",
    )
    parser.add_argument("--out", type=Path, help="new output directory")
    parser.add_argument("--docs", type=Path, help="also copy the report to this markdown file")
    parser.add_argument("--no-autoattack", action="store_true", help="skip grey-box AutoAttack")
    parser.add_argument(
        "--white-autoattack",
        action="store_true",
        help="also run the white-box AutoAttack on S-Full (paper 002's lowest l_2 column; costly)",
    )
    parser.add_argument("--reuse", action="append", default=[], metavar="PRESET=RUN_DIR")
    parser.add_argument(
        "--reuse-eval",
        action="append",
        default=[],
        metavar="PRESET=EVAL_DIR",
        help="take an earlier grid evaluation of PRESET (its results.json) instead of evaluating again",
    )
    args = parser.parse_args(argv)
    if args.test_images < 1:
        parser.error("--test-images must be >= 1")
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    if not kinds or set(kinds) - set(KINDS) or len(set(kinds)) != len(kinds):
        parser.error(f"--models takes distinct names from {', '.join(KINDS)}, got {args.models!r}")
    table = models(args.norm, kinds)
    reuse = parse_pairs(parser, args.reuse, "--reuse", table)
    reuse_eval = parse_pairs(parser, args.reuse_eval, "--reuse-eval", table)
    for preset, run_dir in reuse.items():
        checkpoint_in(Path(run_dir), table[preset][0])
    check_evaluations(parser, reuse_eval, "--reuse-eval", "results.json")
    out = new_output_dir("reproduce_cifar10_reduced", args.out)
    py, commands, eval_runs = sys.executable, [], []
    for preset, (which, _label) in table.items():
        if preset in reuse_eval:
            commands.append(f"# {preset}: reused grid evaluation {reuse_eval[preset]}")
            eval_runs.append(_linked_eval(out, preset, Path(reuse_eval[preset])))
            continue
        train_dir = Path(reuse[preset]) if preset in reuse else out / "train" / preset
        if preset not in reuse:
            experiment = [f"experiment={preset.removeprefix('reduced_')}", "scale=reduced"]
            run_logged([py, "train.py", *experiment, f"seed={args.seed}", f"hydra.run.dir={train_dir}"], commands)
        else:
            commands.append(f"# {preset}: reused training run {train_dir}")
        eval_dir = out / "eval" / preset
        overrides = [f"ckpt_path={checkpoint_in(train_dir, which)}", f"evaluation={GRID}", *NORMS[args.norm][2]]
        overrides += [f"data.test_subset={args.test_images}", f"seed={args.seed}", f"hydra.run.dir={eval_dir}"]
        # AutoAttack where the papers report it: grey-box on None and S-Full (paper 002's rows); not on the
        # natural model, whose None column PGD already drives to 0 (paper 000 reports PGD only there)
        no_aa = args.no_autoattack or preset == "reduced_cifar10_natural"
        dropped = ["preempt_sfgsm", "preempt_spgd"] + (["preempt_none", "preempt_sfull"] if no_aa else [])
        overrides += [f"~evaluation.{k}.attacks.autoattack" for k in dropped]
        if not args.white_autoattack:
            overrides.append("~evaluation.preempt_sfull.white_box.attacks.autoattack")
        run_logged([py, "evaluate.py", *overrides], commands)
        eval_runs.append(eval_dir)
    report = render(eval_runs, commands, args)
    write_report(out, report, args.docs)
    return 0


def _linked_eval(out: Path, preset: str, source: Path) -> Path:
    """A symlink ``out/eval/PRESET`` to an earlier evaluation, so the report names it by preset."""
    link = out / "eval" / preset
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(source.resolve(), target_is_directory=True)
    return link


# per-image correctness columns of each robustifier's row (the white-box column: the eps' of lowest accuracy)
INTERVAL_COLUMNS = {"Clean": "/correct", "Grey PGD": "_pgd/correct", "Grey AA": "_autoattack/correct"}
INTERVAL_COLUMNS |= {"White PGD": "_white_pgd/correct"}


def interval_section(eval_dirs: list[Path], norm: str = "linf") -> list[str]:
    """Every accuracy of the grid with its 95% Wilson interval, and the papers' claims as paired
    comparisons on the same images with a verdict, from the evaluations' per-image records."""
    found = {label_of(d.name): d / "records.csv" for d in eval_dirs if (d / "records.csv").is_file()}
    if not found:
        return []
    records = {label: pd.read_csv(path).set_index("index").sort_index() for label, path in found.items()}
    rows = []
    for label, r in records.items():
        for key, name in PREEMPTIONS:
            if f"{key}/correct" not in r:
                continue
            row = {"Model": label, "Preempt.": name}
            for column, suffix in INTERVAL_COLUMNS.items():
                field = f"{key}{suffix}"
                row[column] = accuracy(r[field].astype(bool)).percent() if field in r else "–"
            rows.append(row)
    claims = []

    def flags(r: pd.DataFrame, field: str) -> pd.Series | None:
        return r[field].astype(bool) if field in r else None

    for label, r in records.items():
        full = flags(r, "preempt_sfull_pgd/correct")
        for key, name in (("preempt_none", "None"), ("preempt_sfgsm", "S-FGSM"), ("preempt_spgd", "S-PGD")):
            other = flags(r, f"{key}_pgd/correct")
            if full is not None and other is not None:
                diff = paired_difference(full.to_numpy(), other.to_numpy())
                claims.append(
                    (
                        label,
                        f"grey-box PGD accuracy, S-Full minus {name}",
                        diff.percent(),
                        _verdict(diff),
                    )
                )
    adv = records.get("ADV")
    for label in ("Ours (preemptive)", "S-FGSM+ADV", "S-PGD+ADV"):
        ours = records.get(label)
        if ours is None or adv is None or list(ours.index) != list(adv.index):
            continue
        a, b = flags(ours, "preempt_sfull_pgd/correct"), flags(adv, "preempt_sfull_pgd/correct")
        if a is not None and b is not None:
            diff = paired_difference(a.to_numpy(), b.to_numpy())
            if label.startswith("Ours"):
                source = f"paper 002: {PAPER_002_OURS_VS_ADV[norm]}"
            else:
                source = f"paper 000, Table 1: {PAPER_000_ROWS[norm][label][1]} vs {PAPER_000_ROWS[norm]['ADV'][1]}"
            text = f"grey-box PGD accuracy under S-Full, {label} minus ADV ({source})"
            claims.append(
                (
                    "both" if label.startswith("Ours") else f"{label} vs ADV",
                    text,
                    diff.percent(),
                    _verdict(diff),
                )
            )
        if not label.startswith("Ours"):  # paper 000: safe-spot-aware training keeps a higher clean accuracy
            a, b = flags(ours, "preempt_none/correct"), flags(adv, "preempt_none/correct")
            if a is not None and b is not None:
                diff = paired_difference(a.to_numpy(), b.to_numpy())
                claims.append(
                    (
                        f"{label} vs ADV",
                        f"clean accuracy, {label} minus ADV (paper 000, Table 1: "
                        f"{PAPER_000_ROWS[norm][label][0]} vs {PAPER_000_ROWS[norm]['ADV'][0]})",
                        diff.percent(),
                        _verdict(diff),
                    )
                )
    columns = ["Model", "Claim (same images)", "Difference [95% CI]", "Verdict"]
    return [
        "## Accuracies with 95% intervals and the papers' claims\n",
        "Wilson intervals over the test images; differences paired on the same images (McNemar p).\n",
        markdown_table(pd.DataFrame(rows)),
        markdown_table(pd.DataFrame(claims, columns=columns)) if claims else "",
    ]


def render(eval_dirs: list[Path], commands: list[str], args: argparse.Namespace) -> str:
    labels = {str(d): label_of(d.name) for d in eval_dirs}
    # each run is named by its row label: two rows may share model and method (S-FGSM+ADV and
    # S-PGD+ADV are both PreemptiveTraining of the same network)
    runs = [
        dataclasses.replace(r, meta={**r.meta, "model": labels[str(r.path)], "method": ""})
        for r in map(load_run, eval_dirs)
    ]
    norm = getattr(args, "norm", "linf")
    name, eps, _ = NORMS[norm]
    by_model = {f"{r.key[0]} / {r.key[1]}": labels[str(r.path)] for r in runs}  # as the tables name them
    grey_white = preemptive_table(runs)
    safe = safe_spot_table(runs)
    for table in (grey_white, safe):
        if table is not None:
            table["Model"] = table["Model"].map(by_model)
    records = [
        f"| {labels[str(r.path)]} | {r.results.get('preempt_sfull/recon_dist_mean', float('nan')):.4f} "
        f"| {100 * r.results.get('preempt_sfull_white_pgd/invalid_rate', float('nan')):.1f} |"
        for r in runs
    ]
    return "\n".join(
        [
            f"# CIFAR-10 reduced reproduction ({name}, eps = delta = {eps})\n",
            f"Generated {datetime.now():%Y-%m-%d %H:%M} by `python scripts/reproduce_cifar10_reduced.py`; "
            f"{args.test_images} seeded test images, seed {args.seed}"
            + (", grey-box AutoAttack off" if args.no_autoattack else ", grey-box AutoAttack on None and S-Full")
            + (
                ", white-box AutoAttack on S-Full"
                if getattr(args, "white_autoattack", False)
                else ", no white-box AutoAttack (paper 002's lowest l_2 column; `--white-autoattack` runs it)"
            )
            + ". Models: the CIFAR-10 presets at `scale=reduced` (small CNN, width 16, 20,000 training images, "
            "8 epochs, PGD-5 training attack).\n",
            "## Paper 002 layout (grey-box and white-box)\n",
            to_markdown(grey_white) if grey_white is not None else "(no preemptive results)\n",
            f"Published (paper 002, {PAPER_002_TABLE[norm]}, WRN-34-10, full CIFAR-10 test set; cells the "
            "extraction lost are shown as –):\n",
            PAPER_002[norm],
            "## Paper 000 layout (clean / grey-box PGD accuracy of the robustified images)\n",
            to_markdown(safe) if safe is not None else "(no preemptive results)\n",
            f"Published (paper 000, Table 1 {'left' if norm == 'linf' else 'right'}, WRN-34-10):\n",
            PAPER_000[norm],
            "## White-box reconstruction (S-Full)\n",
            f"| Model | mean {name} distance of the reconstruction to x_o | misclassified white-box PGD "
            "examples outside B_eps(x_o) (%) |\n|---|---:|---:|",
            *records,
            "",
            *interval_section(eval_dirs, norm),
            "\n## Commands\n",
            "```bash",
            *commands,
            "```\n",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
