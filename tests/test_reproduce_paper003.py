"""Paper 003's smoothed inference as a spec (conf/reproduce/paper003.yaml): the noise-injected
models fine-tuned from the plain model's checkpoint, accuracy against the number of draws and the
vote rules, claims (a)-(c) with paired intervals and the non-inferiority margin of (c), the learned
noise levels of the kept checkpoints."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import SYNTHETIC, InProcessCommands
from safespot.paths import CONFIG_DIR
from safespot.reproduce.claims import evaluate_claim
from safespot.reproduce.engine import check_spec, keep, render, run_spec
from safespot.reproduce.evidence import Evidence
from safespot.reproduce.spec import SpecError, parse_spec
from safespot.reproduce.tables.votes import gain_claim

NS = [1, 32]


def project_spec(tmp_path: Path) -> dict:
    data = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "reproduce" / "paper003.yaml"), resolve=True)
    data["report"], data["records"] = str(tmp_path / "report.md"), str(tmp_path / "records")
    return data


def _votes(root: Path, key: str, rates: dict[int, float], seed: int, n: int = 400) -> None:
    """Records of evaluation=[votes,votes_pgd] with the given PGD accuracy per n (prediction
    smoothing); soft and weighted a little lower, the clean sweep higher."""
    rng = np.random.default_rng(seed)
    base = rng.random(n)
    table = {"index": np.arange(100, 100 + n)}
    for sweep, shift in (("votes", 0.3), ("votes_pgd", 0.0)):
        for rule, penalty in (("majority", 0.0), ("soft", 0.02), ("weighted", 0.04)):
            for k, rate in rates.items():
                table[f"{sweep}_{rule}_n{k}/correct"] = base < rate + shift - penalty
    folder = root / "eval" / key
    folder.mkdir(parents=True)
    pd.DataFrame(table).to_csv(folder / "records.csv", index=False)
    config = {"ns": NS, "votes": ["majority", "soft", "weighted"]}
    names = [c.split("/")[0] for c in table if c != "index"]
    meta = {"evaluation_config": {"votes": config, "votes_pgd": config}, "evaluations": names}
    (folder / "results.json").write_text(json.dumps({"meta": {**meta, "ckpt_path": f"x/{key}/best-epoch001.ckpt"}}))


def _records(root: Path) -> Evidence:
    _votes(root, "adv_resnet20", {1: 0.40, 32: 0.41}, 0)
    _votes(root, "pni_w", {1: 0.35, 32: 0.55}, 1)
    _votes(root, "cni_w", {1: 0.45, 32: 0.45}, 2)


def test_claims_follow_their_intervals_and_c_states_its_margin(tmp_path):
    spec = parse_spec("paper003", project_spec(tmp_path))
    _records(tmp_path / "records")
    evidence = Evidence(spec, tmp_path / "records")
    report = render(spec, tmp_path / "records")
    row = next(line for line in report.splitlines() if line.startswith("| (a) PNI-W: PGD-20"))
    assert " | holds |" in row  # +20 points
    row = next(line for line in report.splitlines() if line.startswith("| (a) CNI-W: PGD-20"))
    assert row.endswith("| does not hold |")  # no change: the interval excludes every gain of 1 point
    assert next(line for line in report.splitlines() if line.startswith("| (b) PGD-20 gain")).endswith("| holds |")
    assert "| PNI-W | 32 |" in report and "| CNI-W | weighted (n = 32) |" in report and "60.4%" in report
    assert "Not in the records (the evaluated checkpoints were not kept): PNI-W, CNI-W." in report
    # (c) "at least as good": non-inferiority with the spec's 1-point margin, the verdict its interval's
    (c,) = [s for s in spec.sections if s["kind"] == "claims" and s["claims"][0]["text"].startswith("(c)")]
    assert all(claim["kind"] == "non_inferiority" and claim["margin"] == 0.01 for claim in c["claims"])
    worse = {**c["claims"][3], "a": "pni_w/votes_pgd_weighted_n32/correct", "b": "pni_w/votes_pgd_majority_n32/correct"}
    result = evaluate_claim(evidence, worse)  # weighted is 4 points worse on a subset of the images
    assert result.difference.high < -0.01 and result.verdict == "does not hold"
    same = evaluate_claim(evidence, {**worse, "a": worse["b"]})
    assert same.difference.low > -0.01 and same.verdict == "holds"  # identical votes: within the margin
    gain = gain_claim(evidence, spec.sections[5]["claims"][0])
    plain = evidence.field("adv_resnet20/votes_pgd_majority_n32/correct").mean()
    plain -= evidence.field("adv_resnet20/votes_pgd_majority_n1/correct").mean()
    noisy = evidence.field("pni_w/votes_pgd_majority_n32/correct").mean()
    noisy -= evidence.field("pni_w/votes_pgd_majority_n1/correct").mean()
    assert gain.difference.value == pytest.approx(noisy - plain)


def test_init_from_names_a_run_of_the_spec_and_no_cycle(tmp_path):
    data = project_spec(tmp_path)
    data["runs"]["pni_w"]["init_from"] = "nope"
    with pytest.raises(SpecError, match="init_from='nope' is not a run of the spec"):
        parse_spec("paper003", data)
    data["runs"]["pni_w"]["init_from"] = "cni_w"
    data["runs"]["cni_w"]["init_from"] = "pni_w"
    with pytest.raises(SpecError, match="start from each other"):
        parse_spec("paper003", data)


# --- the spec run end to end on synthetic data --------------------------------------------------
QUIET = [o for o in SYNTHETIC if not o.startswith("model")]
RESNET = ["model=resnet20", "model.backbone.blocks=1", "method=natural", "trainer.max_epochs=1", "test=false",
          "data.train_subset=128", "data.val_subset=32", "seed=0"]  # fmt: skip
SMALL = ["smoothing.m_attack=1", "evaluation.votes_pgd.attack.steps=1", "evaluation.votes.ns=[1,32]",
         "evaluation.votes_pgd.ns=[1,32]", "data.test_subset=6", "trainer.enable_progress_bar=false"]  # fmt: skip


def test_the_paper003_spec_fine_tunes_the_noisy_models_from_the_plain_one(tmp_path):
    data = project_spec(tmp_path)
    for key, noise in (("adv_resnet20", "none"), ("pni_w", "pni_w"), ("cni_w", "cni_w")):
        data["runs"][key]["overrides"] = [*QUIET, *RESNET, f"model.backbone.noise={noise}"]
        data["evaluations"][key]["overrides"] += SMALL
    spec = parse_spec("paper003", data)
    out, runner = tmp_path / "out", InProcessCommands()
    run_spec(spec, out, runner=runner)
    assert [c[1] for c in runner.calls] == ["train.py", "evaluate.py"] * 3
    plain = next((out / "train" / "adv_resnet20" / "checkpoints").glob("best-*.ckpt"))
    trained = [c for c in runner.calls if c[1] == "train.py"]
    assert not any(c.startswith("init_from=") for c in trained[0])
    assert all(f"init_from={plain}" in c for c in trained[1:])  # paper 003, Section 4
    keep(spec, out)
    report = spec.report.read_text()
    assert "python train.py" in report and "init_from=train/adv_resnet20/checkpoints/best-" in report
    from safespot.models import NoisyConv2d, ResNet20

    layers = sum(isinstance(m, NoisyConv2d) for m in ResNet20(noise="pni_w", blocks=1).modules())
    assert f"| PNI-W | {layers} | 0.250 | 0.250 | 0.250 |" not in report  # learned: no longer the initial 0.25
    assert f"| CNI-W | {layers} |" in report and f"| PNI-W | {layers} |" in report
    assert "Not in the records" not in report
    assert (tmp_path / "records" / "train" / "adv_resnet20" / "checkpoints" / plain.name).is_file()
    assert check_spec(spec) == []
