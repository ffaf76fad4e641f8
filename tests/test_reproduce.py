"""The reduced CIFAR-10 reproductions as specs (conf/reproduce/cifar10_linf.yaml, cifar10_l2.yaml,
safe_spot_aware.yaml): each model's robustification grid on the same images, comparisons of two
models also on the images both classify correctly, the l_2 outer step chosen on validation
images, the reports rendered from records alone; until their records are kept, the reports are
pending stubs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import SYNTHETIC, InProcessCommands
from safespot.reproduce.engine import check_spec, keep, pending, render, run_spec
from safespot.reproduce.evidence import Evidence
from safespot.reproduce.spec import SpecError, load_spec, parse_spec, spec_config
from safespot.stats import accuracy, paired_difference

# a synthetic task the small CNN learns to about 70% in one epoch, PGD breaking some of it
TRAIN = [*SYNTHETIC, "data.amplitude=0.18", "data.noise=0.2", "method=natural", "trainer.max_epochs=1", "test=false"]
IMAGES = 16
ROBUSTIFIERS = ("preempt_none", "preempt_sfgsm", "preempt_spgd", "preempt_sfull")


def fast(overrides: list[str]) -> list[str]:
    """Small settings after a spec evaluation's own: 2-step attacks and searches, 12 images, and
    AutoAttack reduced to 2 APGD-CE iterations wherever the spec keeps it."""
    names = re.findall(r"preempt_\w+", next(o for o in overrides if o.startswith("evaluation=")))
    extra = [f"data.test_subset={IMAGES}", "trainer.enable_progress_bar=false"]
    for name in names:
        extra.append(f"evaluation.{name}.attacks.pgd.steps=2")
        if name != "preempt_sfull_xo" and f"~evaluation.{name}.attacks.autoattack" not in overrides:
            extra += [
                f"evaluation.{name}.attacks.autoattack.attacks=[apgd-ce]",
                f"evaluation.{name}.attacks.autoattack.n_iter=2",
            ]
    if "preempt_spgd" in names:
        extra.append("evaluation.preempt_spgd.robustifier.steps=2")
    if "preempt_sfull_xo" in names:  # paper 000's S-Full: grey-box PGD only
        extra += [
            "evaluation.preempt_sfull_xo.robustifier.max_iter=2",
            "evaluation.preempt_sfull_xo.robustifier.inner_steps=2",
        ]
    if "preempt_sfull" in names:
        extra += [
            "evaluation.preempt_sfull.robustifier.max_iter=2",
            "evaluation.preempt_sfull.robustifier.inner_steps=2",
        ]
        if "evaluation.preempt_sfull.white_box=null" not in overrides:
            extra += [
                "evaluation.preempt_sfull.white_box.attacks.pgd.steps=2",
                "evaluation.preempt_sfull.white_box.eps_fractions=[0.5,1.0]",
            ]
            if "~evaluation.preempt_sfull.white_box.attacks.autoattack" not in overrides:
                white_aa = "evaluation.preempt_sfull.white_box.attacks.autoattack"
                extra += [f"{white_aa}.attacks=[apgd-ce]", f"{white_aa}.n_iter=2"]
    return [*overrides, *extra]


def small_spec(name: str, tmp_path: Path, change=None):
    """The project's spec ``name`` on synthetic models (one quick training per run, seed 0 as the
    spec's, so every evaluation draws the same images) with fast settings after the spec's own, its
    report and records under ``tmp_path``."""
    data = OmegaConf.to_container(spec_config(name), resolve=True)
    data["report"], data["records"] = str(tmp_path / "report.md"), str(tmp_path / "records")
    for k, run in enumerate(data["runs"].values()):  # models of different widths: different models
        run["overrides"] = [*TRAIN, f"model.backbone.width={6 + 2 * k}", "seed=0"]
    for evaluation in data["evaluations"].values():
        evaluation["overrides"] = fast(evaluation["overrides"])
    if change:
        change(data)
    return parse_spec(name, data)


def row(report: str, *start: str) -> list[str]:
    """The cells of the first table row starting with the cells ``start``."""
    prefix = "| " + " | ".join(start) + " |"
    line = next(line for line in report.splitlines() if line.startswith(prefix))
    return [c.strip() for c in line.strip("|").split("|")]


def claim_row(report: str, text: str) -> list[str]:
    return row(report, text)


# many tiny forward passes: one intra-op thread (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(one_thread, tmp_path_factory):
    """Three synthetic models of different widths, trained once: ``{width: run directory}``."""
    from conftest import compose_config
    from safespot.train import train

    root = tmp_path_factory.mktemp("models")
    runs = {}
    for width in (6, 8, 10):
        overrides = [*TRAIN, f"model.backbone.width={width}", "seed=0", "logger=csv"]  # its log, as kept
        train(compose_config("train", overrides, root / str(width)))
        runs[width] = root / str(width)
    return runs


def with_kept_models(spec, trained) -> dict[str, Path]:
    """The spec's runs kept with its records (as ``keep_checkpoint`` keeps them), so the engine
    evaluates them without training again (training through a spec: tests/test_reproduce_figure3.py).
    Returns each run's training directory."""
    sources = {}
    for k, key in enumerate(spec.runs):
        sources[key] = trained[6 + 2 * (k % 3)]
        target = spec.records / "train" / key / "checkpoints"
        target.mkdir(parents=True)
        for ckpt in (sources[key] / "checkpoints").glob("*.ckpt"):
            (target / ckpt.name).write_bytes(ckpt.read_bytes())
        (target.parent / "metrics.csv").write_bytes((sources[key] / "csv" / "metrics.csv").read_bytes())
    return sources


@pytest.fixture(scope="module")
def linf(trained, tmp_path_factory):
    """cifar10_linf run once on the synthetic models: (spec, output directory, runner, report)."""
    tmp = tmp_path_factory.mktemp("linf")
    spec = small_spec("cifar10_linf", tmp)
    with_kept_models(spec, trained)
    runner = InProcessCommands()
    report = run_spec(spec, tmp / "out", runner=runner).read_text()
    return spec, tmp / "out", runner, report


def test_linf_evaluates_each_models_grid_at_the_papers_checkpoint_on_the_same_images(linf):
    spec, out, runner, report = linf
    # one run for the natural model; the preemptive and ADV grids in their spec's pieces, one run each
    pieces = {key: evaluation.pieces for key, evaluation in spec.evaluations.items()}
    assert pieces == {"natural": 1, "preemptive": 8, "adv": 8}
    assert [c[1] for c in runner.calls] == ["evaluate.py"] * sum(pieces.values())
    keys = [key for key in spec.evaluations for _ in range(pieces[key])]
    paths: dict[str, set[str]] = {}
    parts: dict[str, list[str]] = {}
    for key, cmd in zip(keys, runner.calls, strict=True):
        paths.setdefault(key, set()).add(next(c for c in cmd if c.startswith("ckpt_path=")))
        parts.setdefault(key, []).extend(c for c in cmd if c.startswith("data.test_part="))
    assert parts["natural"] == []
    for key in ("preemptive", "adv"):  # every piece once, of 8
        assert sorted(parts[key]) == [f"data.test_part=[{k},8]" for k in range(8)]
    assert all(len(p) == 1 for p in paths.values())  # every piece reads the same checkpoint
    checkpoints = {key: p.pop() for key, p in paths.items()}
    assert checkpoints["preemptive"].endswith("/train/preemptive/checkpoints/last.ckpt")  # paper 002 keeps the last
    assert re.search(r"/train/adv/checkpoints/best-epoch\d+\.ckpt$", checkpoints["adv"])  # the best robust one
    assert re.search(r"/train/natural/checkpoints/best-epoch\d+\.ckpt$", checkpoints["natural"])
    evidence = Evidence(spec, out)
    indices = [evidence.records(key).index for key in ("natural", "preemptive", "adv")]
    assert all(i.equals(indices[0]) for i in indices) and len(indices[0]) == IMAGES  # the same test images
    # grey-box AutoAttack on None and S-Full of the preemptive and ADV models only; no white-box AutoAttack
    for key in ("preemptive", "adv"):
        records = evidence.records(key)
        assert {"preempt_none_autoattack/correct", "preempt_sfull_autoattack/correct"} <= set(records)
        assert "preempt_sfgsm_autoattack/correct" not in records
        assert "preempt_sfull_white_autoattack/correct" not in records
    assert not any("autoattack" in c for c in evidence.records("natural").columns)
    assert "preempt_sfull_white_pgd/correct" in evidence.records("natural")
    # S-Full twice: paper 002's search from a random start (its grid), paper 000's from x_o, grey-box PGD only
    for key in ("natural", "preemptive", "adv"):
        config = evidence.meta(key)["evaluation_config"]
        assert config["preempt_sfull"]["robustifier"]["init"] == "random"
        assert config["preempt_sfull_xo"]["robustifier"]["init"] == "original"
        xo = [c for c in evidence.records(key).columns if c.startswith("preempt_sfull_xo")]
        assert {"preempt_sfull_xo/correct", "preempt_sfull_xo_pgd/correct"} <= set(xo)
        assert not any("autoattack" in c or "white" in c or "8bit" in c for c in xo)


def test_linf_report_is_rendered_from_the_records(linf):
    spec, out, _, report = linf
    evidence = Evidence(spec, out)
    adv, ours = evidence.records("adv"), evidence.records("preemptive")
    cells = row(report, "ADV", "S-Full")
    assert cells[2] == accuracy(adv["preempt_sfull/correct"].astype(bool)).percent()
    assert cells[3] == accuracy(adv["preempt_sfull_pgd/correct"].astype(bool)).percent()
    assert cells[5] == accuracy(adv["preempt_sfull_white_pgd/correct"].astype(bool)).percent()
    none = row(report, "ADV", "None")
    assert none[5] == none[3]  # the None row's white box is its grey box (paper 002, footnote 2)
    assert "| ADV | Ours | 86.72 | – | 81.70 | 86.72 | 86.72 |" in report  # paper 002, Table 1
    assert "| S-PGD+ADV | 91.32 / 39.33 | 91.32 / 77.01 | 91.32 / 63.94 | 91.32 / 89.84 |" in report  # paper 000
    clean, grey = adv["preempt_spgd/correct"].mean(), adv["preempt_spgd_pgd/correct"].mean()
    paper000 = report.partition("## Paper 000 layout")[2]
    assert row(paper000, "ADV")[3] == f"{100 * clean:.1f} / {100 * grey:.1f}"  # paper 000's layout, S-PGD
    # its S-Full column is the search from x_o (paper 000, Algorithm 1), paper 002's grid the random start
    clean, grey = adv["preempt_sfull_xo/correct"].mean(), adv["preempt_sfull_xo_pgd/correct"].mean()
    assert row(paper000, "ADV")[4] == f"{100 * clean:.1f} / {100 * grey:.1f}"
    paper002 = report.partition("## Paper 002 layout")[2].partition("Published (paper 002")[0]
    assert {r.split("|")[2].strip() for r in paper002.splitlines() if r.startswith("| ADV |")} == {
        "None",
        "S-FGSM",
        "S-PGD",
        "S-Full",
    }
    xo_claim = claim_row(report, "ADV: grey PGD accuracy, S-Full (from x_o) minus None")
    a, b = adv["preempt_sfull_xo_pgd/correct"].astype(bool), adv["preempt_none_pgd/correct"].astype(bool)
    assert xo_claim[1] == paired_difference(a, b).percent()
    # a comparison of two models on all images, and on the images both classify correctly
    a, b = ours["preempt_sfull_pgd/correct"].astype(bool), adv["preempt_sfull_pgd/correct"].astype(bool)
    both = (ours["clean/correct"] & adv["clean/correct"]).astype(bool).to_numpy()
    everywhere = claim_row(report, "Under S-Full, Ours minus ADV: grey PGD accuracy")
    restricted = claim_row(report, "Under S-Full, Ours minus ADV: grey PGD accuracy, images both classify correctly")
    assert everywhere[1] == paired_difference(a, b).percent()
    assert restricted[1] == paired_difference(a[both], b[both]).percent()
    assert claim_row(report, "ADV: grey PGD accuracy, S-Full (from x_o) minus S-FGSM")[3] == "+7.98"  # paper 000's gap
    verdicts = next(line for line in report.splitlines() if line.startswith("Verdicts: "))
    assert "Ours > ADV grey PGD (both correct)" in verdicts and "Natural S-Full > None" in verdicts
    # white-box outputs outside B_eps(x_o) at eps' = eps, a share of the images whose x_r is correct
    # (those the attack has to break); images misclassified only outside, a share of those misclassified
    kept = ours["preempt_sfull/correct"].astype(bool).to_numpy()
    eps = evidence.meta("preemptive")["eps"]
    outside = ours["preempt_sfull_white_pgd_f1/dist"].to_numpy()[kept] > eps + 1e-6
    invalid = ours["preempt_sfull_white_pgd_union/invalid"].astype(bool).to_numpy()[kept]
    valid = ~ours["preempt_sfull_white_pgd_union/correct"].astype(bool).to_numpy()[kept]
    cells = row(report, "Ours (preemptive)", f"{ours['preempt_sfull/recon_dist'].mean():.4f}")
    assert cells[2] == accuracy(outside).percent()
    assert cells[3] == accuracy((invalid & ~valid)[invalid | valid]).percent()
    assert "| White-box outputs outside B_eps(x_o) at eps' = eps, % of images with x_r correct |" in report
    assert str(out) not in report and "hydra.run.dir" not in report and "Generated" not in report
    assert render(spec, out) == report  # deterministic
    keep(spec, out, replace=True)
    assert check_spec(spec) == []


def chosen_beta(evidence: Evidence, candidates: list[str]) -> float:
    """The beta of the candidate with the highest validation grey PGD accuracy (ties: the smaller)."""
    scores = {}
    for key in candidates:
        beta = evidence.meta(key)["evaluation_config"]["preempt_sfull"]["robustifier"]["beta"]
        scores[float(beta)] = evidence.records(key)["preempt_sfull_pgd/correct"].mean()
    best = max(scores.values())
    return min(b for b, s in scores.items() if s == best)


def beta_row(data: dict, model: str, beta: float) -> None:
    """Set the ``<model>_beta`` test evaluation's beta (what ``l2_beta.<model>`` sets in the spec)."""
    overrides = data["evaluations"][f"{model}_beta"]["overrides"]
    data["evaluations"][f"{model}_beta"]["overrides"] = [
        *(o for o in overrides if not o.startswith("evaluation.preempt_sfull.robustifier.beta=")),
        f"evaluation.preempt_sfull.robustifier.beta={beta}",
    ]


def test_the_l2_spec_measures_every_column_and_chooses_beta_on_validation_images():
    spec = load_spec("cifar10_l2")
    assert all("threat=l2_0.5" in e.overrides for e in spec.evaluations.values())
    for key in ("preemptive", "adv"):  # white-box AutoAttack on S-Full: paper 002 Table 2's last column
        assert not any("white_box.attacks.autoattack" in o for o in spec.evaluations[key].overrides)
        candidates = [k for k in spec.evaluations if k.startswith(f"val_{key}_")]
        betas = set()
        for candidate in candidates:
            overrides = spec.evaluations[candidate].overrides
            assert "data.eval_split=val" in overrides and spec.evaluations[candidate].run == key
            betas |= {o.split("=")[1] for o in overrides if o.startswith("evaluation.preempt_sfull.robustifier.beta=")}
        assert betas == {"0.001", "0.01", "0.05"}
        test = spec.evaluations[f"{key}_beta"]
        assert not any(o.startswith("data.eval_split") for o in test.overrides)
        beta = spec.settings["l2_beta"][key]
        assert f"evaluation.preempt_sfull.robustifier.beta={beta}" in test.overrides
        assert test.checkpoint == spec.evaluations[key].checkpoint
    changed = load_spec("cifar10_l2", ["l2_beta.adv=0.05"])
    assert changed.evaluations["adv_beta"].overrides[-1] == "evaluation.preempt_sfull.robustifier.beta=0.05"


def test_l2_compares_ours_and_adv_in_four_columns_and_reports_the_validation_choice(tmp_path, trained):
    """Paper 002 Table 2: Ours against ADV on grey / white PGD and AutoAttack, paired, on all images and
    on those both classify correctly; S-Full's beta chosen on held-out training images, never on the
    test images it is then compared on (the preemptive model's sweep; the ADV one is alike)."""
    spec = small_spec("cifar10_l2", tmp_path)
    sources = with_kept_models(spec, trained)
    out, runner = tmp_path / "out", InProcessCommands()
    candidates = [f"val_preemptive_beta{b}" for b in ("1e-3", "1e-2", "5e-2")]
    # the validation sweep first, then the test row with its choice (as the spec says)
    run_spec(spec, out, only=["preemptive", "adv", *candidates], runner=runner)
    choice = chosen_beta(Evidence(spec, out), candidates)
    spec = small_spec("cifar10_l2", tmp_path, lambda data: beta_row(data, "preemptive", choice))
    run_spec(spec, out, only=["preemptive_beta"], runner=runner)
    evidence = Evidence(spec, out)
    held_out = set(json.loads((sources["preemptive"] / "splits.json").read_text())["val"])
    for key in candidates:  # validation images: held out of the model's training
        assert evidence.meta(key)["split"] == "val" and set(evidence.records(key).index) <= held_out
    assert evidence.meta("preemptive_beta")["split"] == "test"
    assert evidence.records("preemptive_beta").index.equals(evidence.records("preemptive").index)
    assert all("threat=l2_0.5" in c for c in runner.calls) and evidence.meta("adv")["norm"] == "l2"
    table2 = next(s for s in spec.sections if s.get("title", "").startswith("## Paper 002, Table 2"))
    choice_section = next(s for s in spec.sections if s["kind"] == "validation_choice")
    choice_section = {**choice_section, "models": {"Ours (preemptive)": choice_section["models"]["Ours (preemptive)"]}}
    report = render(spec, out, (table2, choice_section))
    ours, adv = evidence.records("preemptive"), evidence.records("adv")
    both = (ours["clean/correct"] & adv["clean/correct"]).astype(bool).to_numpy()
    columns = {"Grey PGD": "pgd", "Grey AA": "autoattack", "White PGD": "white_pgd", "White AA": "white_autoattack"}
    for column, field in columns.items():
        a = ours[f"preempt_sfull_{field}/correct"].astype(bool).to_numpy()
        b = adv[f"preempt_sfull_{field}/correct"].astype(bool).to_numpy()
        assert claim_row(report, f"{column} accuracy, Ours minus ADV")[1] == paired_difference(a, b).percent()
        restricted = claim_row(report, f"{column} accuracy, Ours minus ADV, images both classify correctly")
        assert restricted[1] == paired_difference(a[both], b[both]).percent()
    assert claim_row(report, "White AA accuracy, Ours minus ADV")[3] == "+1.31"  # paper 002: 80.79 - 79.48
    verdict = next(line for line in report.splitlines() if line.startswith("Ours minus ADV under S-Full: "))
    assert all(name in verdict for name in ("grey PGD", "grey AA", "white PGD", "white AA (both correct)"))
    # the validation table names the choice; the row with it gives its accuracy on the test images
    validation, _, test = report.partition("## S-Full's l_2 outer step beta")[2].partition("test images:")
    assert row(validation, "Ours (preemptive)", f"{choice:g}")[-1] == "yes"
    flags = evidence.records("preemptive_beta")["preempt_sfull_pgd/correct"].astype(bool)
    assert row(test, "Ours (preemptive)", f"{choice:g}")[-1] == accuracy(flags).percent()
    assert str(tmp_path) not in report


def _choice_evaluation(root: Path, key: str, split: str, beta: float | None, correct: list[bool]) -> None:
    """What evaluate.py leaves of a lone S-Full evaluation: per-image grey PGD flags, the split, beta."""
    run = root / "eval" / key
    run.mkdir(parents=True)
    offset = 1000 if split == "val" else 0
    records = pd.DataFrame({"index": np.arange(len(correct)) + offset, "clean/correct": True})
    records["preempt_sfull/correct"] = True
    records["preempt_sfull_pgd/correct"] = correct
    records.to_csv(run / "records.csv", index=False)
    config = {"preempt_sfull": {"robustifier": {"beta": beta}}}
    meta = {"evaluations": ["clean", "preempt_sfull", "preempt_sfull_pgd"], "groups": {}, "split": split}
    (run / "results.json").write_text(json.dumps({"meta": {**meta, "evaluation_config": config}}))


def _choice_spec(tmp_path: Path, test_beta: float | None, val_splits=("val", "val", "val")):
    root = tmp_path / "root"
    accuracies = {0.001: [True] * 4 + [False] * 6, 0.01: [True] * 7 + [False] * 3, 0.05: [True] * 7 + [False] * 3}
    keys = {beta: f"val_{k}" for k, beta in enumerate(accuracies)}
    for (beta, key), split in zip(keys.items(), val_splits, strict=True):
        _choice_evaluation(root, key, split, beta, accuracies[beta])
    _choice_evaluation(root, "test", "test", test_beta, [True] * 8 + [False] * 2)
    section = {
        "kind": "validation_choice",
        "parameter": "beta",
        "path": "preempt_sfull.robustifier.beta",
        "score": "preempt_sfull_pgd/correct",
        "models": {"M": {"candidates": list(keys.values()), "test": "test"}},
    }
    evaluations = {key: {"run": None} for key in [*keys.values(), "test"]}
    return parse_spec("choice", {"evaluations": evaluations, "sections": [section]}), root


def test_a_setting_is_chosen_on_validation_images_and_the_test_rows_must_use_it(tmp_path):
    """The highest validation accuracy wins, ties go to the smaller value (0.01 over 0.05); the test
    evaluation's stored value must be the chosen one, and every candidate must be a validation run."""
    spec, root = _choice_spec(tmp_path, test_beta=0.01)
    report = render(spec, root)
    assert row(report, "M", "0.01")[-1] == "yes" and row(report, "M", "0.05")[-1] == ""
    assert row(report, "M", "0.001")[2] == accuracy([True] * 4 + [False] * 6).percent()
    assert row(report.split("test images:")[1], "M", "0.01")[2] == accuracy([True] * 8 + [False] * 2).percent()
    for beta in (0.05, None):
        spec, root = _choice_spec(tmp_path / str(beta), test_beta=beta)
        with pytest.raises(SpecError, match=re.escape("the validation images choose beta = 0.01 for M")):
            render(spec, root)
    spec, root = _choice_spec(tmp_path / "on_test", test_beta=0.01, val_splits=("val", "test", "val"))
    with pytest.raises(SpecError, match="val_1 must run on validation images"):
        render(spec, root)


def test_safe_spot_aware_rows_are_compared_with_adv_on_the_same_images(tmp_path, trained):
    spec = small_spec("safe_spot_aware", tmp_path)
    with_kept_models(spec, trained)
    runner = InProcessCommands()
    run_spec(spec, tmp_path / "out", only=["adv", "spgd_adv"], runner=runner)
    evidence = Evidence(spec, tmp_path / "out")
    adv, spgd = evidence.records("adv"), evidence.records("spgd_adv")
    # cifar10_linf's grid (grey-box AutoAttack on None and S-Full), so its ADV and S-FGSM+ADV
    # evaluations are adopted, not run again
    full, linf = load_spec("safe_spot_aware"), load_spec("cifar10_linf")
    for key, same in (("adv", "adv"), ("sfgsm_adv", "preemptive"), ("spgd_adv", "adv")):
        assert full.evaluations[key].overrides == linf.evaluations[same].overrides
        assert full.evaluations[key].pieces == linf.evaluations[same].pieces
    assert full.evaluations["sfgsm_adv"].checkpoint == linf.evaluations["preemptive"].checkpoint == "last"
    assert "preempt_sfull_autoattack/correct" in adv and "preempt_sfgsm_autoattack/correct" not in adv
    claims = next(s for s in spec.sections if s["kind"] == "claims_verdicts")
    among = {**claims, "claims": [c for c in claims["claims"] if "sfgsm_adv/" not in c["a"] + c["b"]]}
    report = render(spec, tmp_path / "out", (among,))
    # paper 000's claims: S-Full started at x_o (its Algorithm 1)
    a, b = spgd["preempt_sfull_xo_pgd/correct"].astype(bool), adv["preempt_sfull_xo_pgd/correct"].astype(bool)
    both = (spgd["clean/correct"] & adv["clean/correct"]).astype(bool).to_numpy()
    text = "Grey PGD accuracy under S-Full (from x_o), S-PGD+ADV minus ADV"
    assert claim_row(report, text)[1] == paired_difference(a, b).percent() and claim_row(report, text)[3] == "+4.78"
    restricted = claim_row(report, f"{text}, images both classify correctly")
    assert restricted[1] == paired_difference(a[both], b[both]).percent()
    clean = claim_row(report, "Clean accuracy, S-PGD+ADV minus ADV")  # paper 000: 91.32 vs 86.51
    assert clean[3] == "+4.81" and "Clean accuracy, S-PGD+ADV minus ADV, images both" not in report


def test_specs_share_the_cifar10_partial_through_include(tmp_path, monkeypatch):
    """cifar10_linf, safe_spot_aware and figure3_adv train the same ADV model and evaluate the same
    images: one definition in conf/reproduce/_cifar10_common.yaml, which is not a spec itself."""
    import safespot.reproduce.spec as spec_module

    adv = ("experiment=cifar10_adv_linf", "scale=reduced_preact", "method=fast_adversarial", "seed=0")
    assert all(
        load_spec(name).runs["adv"].overrides == adv for name in ("cifar10_linf", "safe_spot_aware", "figure3_adv")
    )
    assert "_cifar10_common" not in spec_module.spec_names()
    fewer = load_spec("cifar10_linf", ["cifar10.images=50"])  # a setting of the partial, changed with --set
    assert all("data.test_subset=50" in e.overrides for e in fewer.evaluations.values())
    monkeypatch.setattr(spec_module, "spec_dir", lambda: tmp_path)
    (tmp_path / "common.yaml").write_text("shared: 1\n")
    for include in ("[_missing]", "[common]"):
        (tmp_path / "x.yaml").write_text(f"include: {include}\ntitle: x\n")
        with pytest.raises(SpecError, match="include names a partial _NAME"):
            load_spec("x")


@pytest.mark.parametrize("name", ["cifar10_linf", "cifar10_l2", "safe_spot_aware", "figure3", "figure3_adv"])
def test_each_report_is_a_pending_stub_or_equals_its_records(name):
    """Until its measurement is redone with kept records, a report is a stub naming the command that
    makes it, marked pending (no number of an earlier, unkept run, no local path); then it is the
    rendering of its records."""
    spec = load_spec(name)
    text = spec.report.read_text()
    assert not re.search(r"(?<![\w.])/(work|home|tmp|root|Users|mnt)/", text)  # no absolute local path
    assert check_spec(spec) == []
    if pending(spec):
        assert f"<!-- safespot-reproduce pending {name} -->" in text.splitlines()
        assert "make reproduce-" in text and f"safespot.reproduce run {name}" in text
        assert not re.search(r"\d\.\d \[", text) and "| --- |" not in text and "|---|" not in text
