"""Report generation from fake evaluation run directories: tables, plots, CSV and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from safespot.report import load_run, main, plot_robust_vs_eps, summary_table, to_markdown

EVALS = ["clean", "pgd", "autoattack"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, name: str, accs: dict[str, float], records: bool = True, **meta) -> Path:
    """A run directory as ``evaluate.py`` writes it: results.json and, optionally, records.csv."""
    run = root / name
    run.mkdir()
    results = {f"{k}/acc": v for k, v in accs.items()} | {"n_images": 20, "meta": {"evaluations": EVALS} | meta}
    (run / "results.json").write_text(json.dumps(results))
    if records:
        rng = np.random.default_rng(len(name))
        frame = {"index": np.arange(20), "label": rng.integers(0, 10, 20)}
        for i, e in enumerate(EVALS):
            frame |= {f"{e}/pred": rng.integers(0, 10, 20), f"{e}/correct": rng.integers(0, 2, 20)}
            frame |= {f"{e}/loss": rng.gamma(2.0, 0.5 + i, 20), f"{e}/dist": np.zeros(20) if e == "clean" else 0.03}
        pd.DataFrame(frame).to_csv(run / "records.csv", index=False)
    return run


@pytest.fixture
def run_dirs(tmp_path: Path) -> list[Path]:
    """Two seeds of adversarial training at 8/255, one at 4/255, and natural training (without records)."""
    at = {"model": "small_cnn", "method": "AdversarialTraining", "norm": "linf"}
    return [
        make_run(
            tmp_path, "at_s0", dict(clean=0.80, pgd=0.45, autoattack=0.41, worst_case=0.40), eps=8 / 255, seed=0, **at
        ),
        make_run(
            tmp_path, "at_s1", dict(clean=0.82, pgd=0.47, autoattack=0.43, worst_case=0.42), eps=0.0313725, seed=1, **at
        ),
        make_run(
            tmp_path, "at_e4", dict(clean=0.85, pgd=0.60, autoattack=0.57, worst_case=0.56), eps=4 / 255, seed=0, **at
        ),
        make_run(
            tmp_path,
            "nt",
            dict(clean=0.93, pgd=0.0, autoattack=0.0, worst_case=0.0),
            records=False,
            model="small_cnn",
            method="NaturalTraining",
            norm="linf",
            eps=8 / 255,
        ),
    ]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000, path


def test_summary_table_averages_seeds(run_dirs):
    table = summary_table([load_run(d) for d in run_dirs])
    assert list(table.columns[:5]) == ["model", "method", "norm", "eps", "n_runs"]
    assert [c for c in table.columns[5:] if not c.endswith("_std")] == [*EVALS, "worst_case"]
    assert table["n_runs"].tolist() == [1, 2, 1]  # AT 4/255, AT 8/255 (two seeds, eps noise grouped), NT
    row = table.iloc[1]
    assert row["clean"] == pytest.approx(81.0) and row["clean_std"] == pytest.approx(math.sqrt(2))
    assert row["pgd"] == pytest.approx(46.0) and math.isnan(table.iloc[0]["pgd_std"])


def test_markdown_in_papers_format(run_dirs):
    lines = to_markdown(summary_table([load_run(d) for d in run_dirs])).splitlines()
    assert lines[0] == "| Model | Method | ε | Runs | Clean | PGD | AutoAttack | Worst case |"  # no Norm: all linf
    assert lines[1] == "|---|---|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == "| small_cnn | AdversarialTraining | 4/255 | 1 | 85.0 | 60.0 | 57.0 | 56.0 |"
    assert (
        lines[3]
        == "| small_cnn | AdversarialTraining | 8/255 | 2 | 81.0 ± 1.4 | 46.0 ± 1.4 | 42.0 ± 1.4 | 41.0 ± 1.4 |"
    )
    assert lines[4] == "| small_cnn | NaturalTraining | 8/255 | 1 | 93.0 | 0.0 | 0.0 | 0.0 |"
    assert len(lines) == 5


def test_generic_markdown_and_missing_meta(tmp_path):
    assert to_markdown(pd.DataFrame({"a|b": ["x"], "v": [0.123], "w": [float("nan")]})).splitlines() == [
        "| a\\|b | v | w |",
        "|---|---:|---:|",
        "| x | 0.1 | – |",
    ]
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "results.json").write_text(json.dumps({"clean/acc": 0.5, "pgd/acc": 0.25}))
    run = load_run(tmp_path / "bare")
    assert run.meta == {} and run.records is None and run.key == ("?", "?", None, None)
    assert to_markdown(summary_table([run])).splitlines()[2] == "| ? | ? | 50.0 | 25.0 |"


def test_main_writes_report_plots_and_csv(run_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*map(str, run_dirs), "--out", str(out), "--title", "My report"]) == 0
    assert "report.md" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert report.startswith("# My report\n") and "| 81.0 ± 1.4 | 46.0 ± 1.4 |" in report
    assert "![robust_vs_eps](robust_vs_eps.png)" in report and "## Runs" in report
    assert_png(out / "robust_vs_eps.png")
    assert_png(out / "loss_hist.png")
    expected = summary_table([load_run(d) for d in run_dirs])
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv"), expected, check_dtype=False)
    assert to_markdown(pd.read_csv(out / "summary.csv")) == to_markdown(expected)
    assert sorted(p.name for p in run_dirs[0].iterdir()) == ["records.csv", "results.json"]  # inputs untouched


def test_single_eps_skips_eps_plot(run_dirs, tmp_path):
    assert plot_robust_vs_eps([load_run(run_dirs[0])], tmp_path / "eps.png") is None
    assert not (tmp_path / "eps.png").exists()


def test_missing_run_dir_is_a_clear_error(run_dirs, tmp_path, capsys):
    assert main([str(run_dirs[0]), str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "run directory not found" in err and "nope" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "no results.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_out_dir_is_not_overwritten(run_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("keep me")
    assert main([str(run_dirs[0]), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["report.md"] and (out / "report.md").read_text() == "keep me"


def test_default_out_dirs_are_unique(run_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([str(run_dirs[2])]) == 0 and main([str(run_dirs[2])]) == 0
    outs = sorted(tmp_path.glob("report_*"))
    assert len(outs) == 2 and all((o / "report.md").is_file() for o in outs)


def test_preemptive_tables_in_the_papers_layouts(tmp_path):
    import json

    from safespot.report import load_run, preemptive_table, safe_spot_table, to_markdown

    run_dir = tmp_path / "pre"
    run_dir.mkdir()
    results = {
        "clean/acc": 0.8,
        "n_images": 10,
        "preempt_none/acc": 0.8,
        "preempt_none_pgd/acc": 0.4,
        "preempt_none/safe_spot_rate": 0.5,
        "preempt_sfull/acc": 0.9,
        "preempt_sfull_pgd/acc": 0.7,
        "preempt_sfull_autoattack/acc": 0.65,
        "preempt_sfull_white_pgd/acc": 0.6,
        "preempt_sfull/safe_spot_rate": 0.8,
        "meta": {"model": "SmallCNN", "method": "AdversarialTraining", "norm": "linf", "eps": 8 / 255},
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    run = load_run(run_dir)
    table = preemptive_table([run])
    assert list(table["Preempt."]) == ["None", "S-Full"]
    row = table.iloc[1]
    assert (row["Clean"], row["Grey PGD"], row["Grey AA"], row["White PGD"]) == pytest.approx((90, 70, 65, 60))
    assert "–" in to_markdown(table)  # White AA was not run
    assert safe_spot_table([run]).iloc[0]["S-Full"] == "90.0 / 70.0"
