"""Paper 004's Table 1 as a spec (conf/reproduce/paper004.yaml): the rows on the same images with
bootstrap intervals, the paper's claims with SD = 2 first, each model's training budget read from
the records of the checkpoint its evaluations scored, each evaluation's attack set read from its
records, and the rows without records yet (AWP, the equal-budget FLSS model) as not measured."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import SYNTHETIC, InProcessCommands
from safespot.paths import CONFIG_DIR
from safespot.reproduce.engine import check_spec, keep, render, run_spec
from safespot.reproduce.evidence import Evidence
from safespot.reproduce.spec import SpecError, parse_spec
from safespot.reproduce.tables.rejection import rejection_claim

ATTACKS = ["pgd", "apgd_ce"]
N = 120


def project_spec(tmp_path: Path, **changes) -> dict:
    data = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "reproduce" / "paper004.yaml"), resolve=True)
    data["report"], data["records"] = str(tmp_path / "report.md"), str(tmp_path / "records")
    data["bootstrap"] = {"replicates": 200, "seed": 0}
    data.update(changes)
    return data


# --- records written by hand: what the runs leave --------------------------------------------
def _metrics(folder: Path, epochs: int, val_acc: float = 0.5379999876022339) -> None:
    """A training run's metrics.csv: ``epochs`` epochs, validation accuracy rising to ``val_acc``."""
    rows = [{"epoch": e, "step": e, "train/loss_epoch": 1.0, "train/kl2": 0.1} for e in range(epochs)]
    rows += [{"epoch": e, "step": e, "val/acc": val_acc - 0.01 * (epochs - 1 - e), "val/robust_acc": 0.3}
             for e in range(epochs)]  # fmt: skip
    rows.append({"epoch": epochs, "step": epochs, "test/acc": 0.4})  # the test step, after training
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)


def _train(root: Path, run: str, epochs: int, best: int) -> None:
    _metrics(root / "train" / run, epochs)
    (root / "train" / run / "checkpoints").mkdir(parents=True)
    (root / "train" / run / "checkpoints" / f"best-epoch{best:03d}.ckpt").write_bytes(b"weights")


def _eval(root: Path, key: str, ckpt: str, robust: float, vote: bool) -> None:
    """records.csv / results.json as a rejection evaluation writes them: clean correct on 80% of
    the images, every attack correct on the first ``robust`` share, confidence scores in (0, 1)."""
    name, views = ("rejection_flss", ["ns", "vote"]) if vote else ("rejection_conf", ["ns"])
    rng = np.random.default_rng(0)
    position = np.arange(N) / N
    table = {"index": np.arange(N)[::-1]}  # stored out of order: rows are read by image index
    for view in views:
        for point in ["clean", *ATTACKS]:
            correct = position < (0.8 if point == "clean" else robust)
            table[f"{name}_{point}_{view}/correct"] = correct
            table[f"{name}_{point}_{view}/score"] = rng.uniform(0.5, 1.0, N) * np.where(correct, 1.0, 0.7)
    folder = root / "eval" / key
    folder.mkdir(parents=True)
    pd.DataFrame(table).to_csv(folder / "records.csv", index=False)
    config = {"_target_": "safespot.evaluation.rejection.RejectionEvaluation", "name": name, "views": views}
    config["attacks"] = {
        "pgd": {"_target_": "safespot.attacks.PGD", "steps": 100, "loss": "ce", "eot": 1},
        "apgd_ce": {"_target_": "safespot.attacks.AutoAttack", "attacks": ["apgd-ce"], "n_iter": 100},
    }
    names = [f"{name}_{p}_{v}" for v in views for p in ["clean", *ATTACKS]]
    meta = {"evaluation_config": {name: config}, "ckpt_path": f"/elsewhere/checkpoints/{ckpt}", "evaluations": names}
    (folder / "results.json").write_text(json.dumps({"meta": meta}))


def _records(root: Path, flss_ckpt: str = "best-epoch002.ckpt") -> None:
    """PGD-AT and TRADES trained 2 epochs, FLSS 3 (run flss_24ep) and 2 (run flss_16ep, not
    evaluated); four evaluations, FLSS the most robust."""
    for run, epochs, best in (("adv_linf", 2, 1), ("trades_linf", 2, 1), ("flss_24ep", 3, 2), ("flss_16ep", 2, 1)):
        _train(root, run, epochs, best)
    robust = {"pgd_at": 0.40, "trades": 0.42, "flss_sd1": 0.60, "flss_sd2": 0.62}
    ckpts = {"pgd_at": "best-epoch001.ckpt", "trades": "best-epoch001.ckpt"}
    for key, share in robust.items():
        _eval(root, key, ckpts.get(key, flss_ckpt), share, vote=key.startswith("flss"))
    log = [{"key": "train/flss_24ep", "command": "python train.py experiment=reduced_cifar10_flss", "minutes": 2.04}]
    (root / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))


def test_the_report_names_each_evaluated_models_budget_and_puts_sd2_first(tmp_path):
    spec = parse_spec("paper004", project_spec(tmp_path))
    root = tmp_path / "records"
    _records(root)
    report = render(spec, root)
    models = [line for line in report.splitlines() if line.startswith("| ") and " | `" in line]  # the training table
    rows = {line.split(" | ")[0].lstrip("| "): line for line in models}
    # the FLSS model of Table 1 trained 3 epochs; its evaluations scored the epoch-3 checkpoint
    assert (
        "| 3 | 2.0 min |" in rows["FLSS (run flss_24ep)"] and "| 3 of 3: 53.8 / 30.0 |" in rows["FLSS (run flss_24ep)"]
    )
    assert rows["PGD-AT"].endswith("| 2 | – | 53.8 | 2 of 2: 53.8 / 30.0 |")  # rounded, not truncated (53.79...)
    assert "(PGD-AT: 2 epochs; TRADES: 2 epochs; FLSS (run flss_24ep): 3 epochs)" in report
    missing = "`awp` (run `awp_linf`); `flss_16ep_sd2`, `flss_16ep_sd1` (run `flss_16ep`, 2 epochs)"
    assert f"No records yet of the evaluations {missing}" in report
    assert "safespot-reproduce run paper004 --out DIR && safespot-reproduce keep paper004 DIR --replace" in report
    assert "| FLSS (SD=2), run flss_16ep | Maj. Vote | – |" in report and "| AWP | Confidence | – |" in report
    # each evaluation's attack set, as its records hold it
    assert "| `pgd_at` | PGD-AT | `pgd` (PGD-100, ce), `apgd_ce` (APGD-CE, 100 iterations) |" in report
    assert "| `awp` | AWP | not measured (no records) |" in report
    assert "| PGD-AT | Confidence | 80.0 [" in report  # Acc_nat,NS with its interval
    claims = [line for line in report.splitlines() if line.startswith("| FLSS") and " minus " in line]
    assert claims[0].startswith("| FLSS (SD=2) minus PGD-AT: Acc_adv,10%")  # the primary setting leads
    assert "| FLSS (SD=1) minus PGD-AT: Acc_adv,10%, FLSS higher | +" in report
    unmeasured = [line for line in claims if "not measured (no records)" in line]
    assert len(unmeasured) == 12  # the six claims against AWP, the six equal-budget claims
    assert all("AWP" in line or "16 epochs" in line for line in unmeasured)
    assert "| FLSS (SD=2) | Maj. Vote | 80.51 | 77.68 |" in report  # the published rows
    assert "| AWP | Confidence | 80.58 | 80.58 | 89.14 |" in report


def test_a_budget_is_read_from_the_checkpoint_the_evaluations_scored(tmp_path):
    """An evaluation that scored a checkpoint its run does not keep (another run's) is refused:
    the report would name the wrong training budget."""
    spec = parse_spec("paper004", project_spec(tmp_path))
    root = tmp_path / "records"
    _records(root, flss_ckpt="best-epoch001.ckpt")  # the 2-epoch run's checkpoint
    with pytest.raises(SpecError, match="which run 'flss_24ep' does not keep"):
        render(spec, root)


def test_claims_are_paired_bootstrap_differences_with_the_papers_direction(tmp_path):
    spec = parse_spec("paper004", project_spec(tmp_path))
    root = tmp_path / "records"
    _records(root)
    evidence = Evidence(spec, root)
    higher = rejection_claim(evidence, {"text": "t", "a": "flss_sd2", "b": "pgd_at", "metric": "acc_adv_rej"})
    assert higher.verdict == "holds" and higher.difference.low > 0
    # the same rows, the other way round: a claim that PGD-AT raises Acc_adv,10% does not hold
    lower = rejection_claim(evidence, {"text": "t", "a": "pgd_at", "b": "flss_sd2", "metric": "acc_adv_rej"})
    assert lower.verdict == "does not hold" and lower.difference.value == pytest.approx(-higher.difference.value)
    assert lower.difference.low == pytest.approx(-higher.difference.high)  # the same resamples: paired
    # "lowers FW": judged on b minus a; FLSS accepts fewer wrong images here
    fw = {"text": "t", "a": "flss_sd2", "b": "pgd_at", "metric": "fw", "direction": "lower"}
    result = rejection_claim(evidence, fw)
    assert result.difference.high < 0 and result.verdict == "holds"
    # the size in the claimed direction: a reduction beyond a paper's smaller one is "larger"
    smaller_reduction, larger_reduction = 50 * result.difference.high, 200 * result.difference.low
    assert rejection_claim(evidence, {**fw, "paper": smaller_reduction}).size == "larger than the paper's"
    assert rejection_claim(evidence, {**fw, "paper": larger_reduction}).size == "smaller than the paper's"
    # FC at most 3 points lower: a non-inferiority margin; equal rows hold it
    same = rejection_claim(evidence, {"text": "t", "a": "flss_sd1", "b": "flss_sd1", "metric": "fc",
                                      "kind": "non_inferiority", "margin": 0.03})  # fmt: skip
    assert same.difference.low == same.difference.high == 0 and same.verdict == "holds"
    with pytest.raises(SpecError, match="metric must be one of"):
        rejection_claim(evidence, {"text": "t", "a": "flss_sd2", "b": "pgd_at", "metric": "auroc"})


# --- the spec run end to end on synthetic data --------------------------------------------------
QUIET = [o for o in SYNTHETIC if not o.startswith(("logger", "model"))]
TRAIN = [*QUIET, "logger=csv", "trainer.max_epochs=1", "test=false", "seed=0", "threat.steps=1",
         "method.val_attack.steps=1", "data.train_subset=128", "data.val_subset=32"]  # fmt: skip
SMALL_CNN = ["model=small_cnn", "model.backbone.width=8"]
FLSS = ["method=flss", "model.backbone.width=4", "model.hidden=[8]", "model.n_vote=8"]


def _small_evaluation(name: str) -> list[str]:
    dropped = ["apgd_ce", "apgd_dlr"] + (["pgd_eot", "apgd_ce_eot"] if name == "rejection_flss" else [])
    small = [f"evaluation.{name}.attacks.{a}.steps=1" for a in ("pgd", "pgd_cw", "gama_pgd", "gama_mt", "mt_pgd")]
    small += [f"evaluation.{name}.attacks.{a}.n_targets=2" for a in ("gama_mt", "mt_pgd")]
    small += [f"~evaluation.{name}.attacks.{a}" for a in dropped]
    small += [f"evaluation.{name}.n_samples=8", "data.test_subset=12", "trainer.enable_progress_bar=false"]
    return small + ([f"evaluation.{name}.attack_ns=[pgd,pgd_cw]"] if name == "rejection_flss" else [])


def small_spec(tmp_path: Path):
    """The project's spec on synthetic models: FLSS of run flss_24ep trains 2 epochs, the others 1."""
    data = project_spec(tmp_path, bootstrap={"replicates": 50, "seed": 0})
    data["runs"] = {k: v for k, v in data["runs"].items() if not k.startswith("explore_")}
    data["runs"]["adv_linf"]["overrides"] = [*TRAIN, *SMALL_CNN, "method=adversarial"]
    data["runs"]["trades_linf"]["overrides"] = [*TRAIN, *SMALL_CNN, "method=trades"]
    data["runs"]["awp_linf"]["overrides"] = [*TRAIN, *SMALL_CNN, "method=awp"]
    data["runs"]["flss_24ep"]["overrides"] = [*TRAIN, *FLSS, "trainer.max_epochs=2"]
    data["runs"]["flss_16ep"]["overrides"] = [*TRAIN, *FLSS]
    for evaluation in data["evaluations"].values():
        name = "rejection_flss" if evaluation["run"].startswith("flss") else "rejection_conf"
        evaluation["overrides"] += _small_evaluation(name)
    return parse_spec("paper004", data)


def test_the_paper004_spec_runs_keeps_and_adds_the_equal_budget_rows_later(tmp_path):
    spec = small_spec(tmp_path)
    out, runner = tmp_path / "out", InProcessCommands()
    run_spec(spec, out, only=["pgd_at", "trades", "flss_sd1", "flss_sd2"], runner=runner)
    trained = [c for c in runner.calls if c[1] == "train.py"]
    assert len(trained) == 3 and not any("flss_16ep" in " ".join(c) for c in runner.calls)
    flss = [c for c in runner.calls if "evaluation=[rejection_flss]" in c]
    assert ["evaluation.rejection_flss.sd_scale=1" in c for c in flss] == [True, False]
    assert all(f"ckpt_path={out}/train/flss_24ep/checkpoints/" in " ".join(c) for c in flss)
    with pytest.raises(SpecError, match="has not finished"):
        keep(spec, out)  # the equal-budget rows have not run
    report = render(spec, out)
    assert "(PGD-AT: 1 epochs; TRADES: 1 epochs; FLSS (run flss_24ep): 2 epochs)" in report
    assert "| FLSS (SD=2) | Maj. Vote | " in report and "| FLSS (SD=2), run flss_16ep | Maj. Vote | – |" in report

    run_spec(spec, out, runner=runner)  # resumed: AWP, the equal-budget model, their evaluations
    added = [c[1] for c in runner.calls[len(trained) + 4 :]]
    assert added == ["train.py", "evaluate.py", "train.py", "evaluate.py", "evaluate.py"]
    kept = keep(spec, out)
    assert all(next((kept / "train" / r / "checkpoints").glob("best-*.ckpt"), None) for r in spec.runs)
    assert "No records yet" not in spec.report.read_text() and check_spec(spec) == []

    # a later sitting re-runs the equal-budget rows alone on the kept checkpoint; keeping them
    # replaces those rows and keeps every other run of the records, with its log lines
    later = InProcessCommands()
    run_spec(spec, tmp_path / "later", only=["flss_16ep_sd2", "flss_16ep_sd1"], runner=later)
    assert [c[1] for c in later.calls] == ["evaluate.py", "evaluate.py"]  # the kept checkpoint, not retrained
    assert all(f"ckpt_path={kept}/train/flss_16ep/checkpoints/" in " ".join(c) for c in later.calls)
    keep(spec, tmp_path / "later", replace=True)
    assert (kept / "train" / "flss_24ep" / "checkpoints").is_dir() and (kept / "eval" / "pgd_at").is_dir()
    keys = [json.loads(line)["key"] for line in (kept / "log.jsonl").read_text().splitlines()]
    assert keys.count("eval/flss_16ep_sd2") == 1 and keys[-2:] == ["eval/flss_16ep_sd2", "eval/flss_16ep_sd1"]
    assert "train/flss_24ep" in keys and "eval/pgd_at" in keys
    assert "| FLSS (SD=2), 16 epochs, minus PGD-AT: Acc_adv,10%, FLSS higher | " in spec.report.read_text()
    assert check_spec(spec) == []
