"""Paper 003's smoothed inference as a spec (conf/reproduce/paper003.yaml): the noise-injected
models fine-tuned from the plain model's checkpoint, accuracy against the number of draws and the
vote rules, claims (a)-(c) with paired intervals and the non-inferiority margin of (c), the learned
noise levels of the kept checkpoints."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import SYNTHETIC, InProcessCommands, compose_config
from safespot.paths import CONFIG_DIR
from safespot.reproduce.claims import evaluate_claim
from safespot.reproduce.engine import check_spec, keep, render, run_spec
from safespot.reproduce.evidence import Evidence
from safespot.reproduce.spec import SpecError, load_spec, parse_spec
from safespot.reproduce.tables.votes import gain_claim
from safespot.train import train

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
    gain = gain_claim(evidence, next(s for s in spec.sections if s["kind"] == "gain_claims")["claims"][0])
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


#: the runs and evaluations of the kept 2026-12-03 measurement (the others are measured later)
KEPT = ("adv_resnet20", "pni_w", "cni_w")


def kept_part(data: dict) -> dict:
    """The spec restricted to the kept measurement's runs, evaluations and the sections on them."""
    added = [k for k in data["evaluations"] if k not in KEPT]
    data["runs"] = {k: v for k, v in data["runs"].items() if k in KEPT}
    data["evaluations"] = {k: v for k, v in data["evaluations"].items() if k in KEPT}
    data["sections"] = [s for s in data["sections"] if not any(key in str(s) for key in added)]
    return data


def test_the_paper003_spec_fine_tunes_the_noisy_models_from_the_plain_one(tmp_path):
    data = kept_part(project_spec(tmp_path))
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


# --- the evaluations added since the kept measurement -------------------------------------------
def test_cni_w_diag_init_is_chosen_on_validation_images_and_the_added_evaluations_are_the_papers():
    """CNI-W's initial diagonal: three fine-tunes (the reference 0.0625, 0.01, 0.0025) scored on
    held-out training images; the tuned rows and the transfer source use the spec's value. The
    paper's vote sizes (256 and 512 draws, clean images, no attack); the transfer attack from
    another CNI-W instance, plain and smoothed; NAttack on the plain ADV model and the smoothed
    noise-injected ones."""
    spec = load_spec("paper003")
    candidates = {k: e for k, e in spec.evaluations.items() if k.startswith("val_cni_w_diag_")}
    values = set()
    for key, evaluation in candidates.items():
        assert "data.eval_split=val" in evaluation.overrides and evaluation.run == key.removeprefix("val_")
        (diag,) = [o for o in spec.runs[evaluation.run].overrides if o.startswith("model.backbone.diag_init=")]
        values.add(float(diag.split("=")[1]))
        assert spec.runs[evaluation.run].init_from == "adv_resnet20"
    assert values == {0.0625, 0.01, 0.0025}
    chosen = spec.settings["cni_w_diag_init"]
    tuned = [k for k, e in spec.evaluations.items() if e.run == f"cni_w_diag_{chosen}" and not k.startswith("val_")]
    assert set(tuned) >= {"cni_w_tuned", "votes512_cni_w_tuned", "transfer_cni_w", "nattack_cni_w_tuned"}
    assert not any("data.eval_split" in o for k in tuned for o in spec.evaluations[k].overrides)
    assert load_spec("paper003", ["cni_w_diag_init=0.0025"]).evaluations["cni_w_tuned"].run == "cni_w_diag_0.0025"
    source = spec.runs["cni_w_source"]
    assert f"model.backbone.diag_init={chosen}" in source.overrides and "seed=1" in source.overrides
    assert source.init_from == "adv_resnet20_seed1" and "seed=1" in spec.runs["adv_resnet20_seed1"].overrides
    for key in ("votes512_adv_resnet20", "votes512_pni_w", "votes512_cni_w_tuned", "votes512_cni_w_tuned_sigma0"):
        overrides = spec.evaluations[key].overrides
        assert "evaluation=[votes]" in overrides and "evaluation.votes.ns=[1,32,256,512]" in overrides
    assert "smoothing.sigma=0" in spec.evaluations["votes512_cni_w_tuned_sigma0"].overrides
    for key in ("transfer_cni_w", "transfer_cni_w_smoothed_source"):
        assert "evaluation.transfer.source_ckpt_path={checkpoint:cni_w_source/best}" in spec.evaluations[key].overrides
    assert "evaluation.transfer.source_sigma=0.12" in spec.evaluations["transfer_cni_w_smoothed_source"].overrides
    assert not any(o.startswith("smoothing.") for o in spec.evaluations["nattack_adv_resnet20"].overrides)
    assert all(
        "evaluation=[clean,nattack]" in spec.evaluations[k].overrides for k in ("nattack_pni_w", "nattack_cni_w_tuned")
    )


def _diag_records(root: Path, key: str, split: str, diag: float, pgd: float, n: int = 200) -> None:
    """Records of a CNI-W vote sweep: PGD-20 accuracy ``pgd`` at n = 32, the model's diag_init and
    weight draws stored as evaluate.py stores them."""
    rng = np.random.default_rng(int(diag * 1e4))
    base = rng.random(n)
    table = {"index": np.arange(n) + (5000 if split == "val" else 100)}  # the test images of _votes
    for k in (1, 32):
        table[f"votes_majority_n{k}/correct"] = base < 0.6
        table[f"votes_pgd_majority_n{k}/correct"] = base < (pgd if k == 32 else pgd - 0.05)
    folder = root / "eval" / key
    folder.mkdir(parents=True)
    pd.DataFrame(table).to_csv(folder / "records.csv", index=False)
    meta = {
        "evaluations": [c.split("/")[0] for c in table if c != "index"],
        "split": split,
        "model_config": {"backbone": {"noise": "cni_w", "diag_init": diag, "noise_per": "forward"}},
        "noise_per": "forward",
        "ckpt_path": f"x/{key}/best-epoch001.ckpt",
    }
    (folder / "results.json").write_text(json.dumps({"meta": meta}))


def test_the_validation_choice_of_diag_init_renders_from_the_models_stored_config(tmp_path):
    """The report chooses diag_init from the candidates' validation records (the value stored in
    the evaluated model's config), refuses tuned rows made with another value, and until the
    added evaluations have records renders them as not measured with the commands that add them."""
    spec = parse_spec("paper003", project_spec(tmp_path))
    root = tmp_path / "records"
    _records(root)
    report = render(spec, root)
    assert "Not measured yet (no records of `val_cni_w_diag_0.0625`, `val_cni_w_diag_0.01`" in report
    assert "| CNI-W (tuned diag_init) | 0 | not measured | not measured | not measured | not measured |" in report
    assert report.count("safespot-reproduce run paper003 --out DIR") == 2  # the commands, listed once
    assert "- (d) NAttack: accuracy under attack, smoothed CNI-W (tuned diag_init) minus ResNet-20 ADV" in report
    assert "one weight draw per image (records made before `model.backbone.noise_per` existed" in report
    for diag, pgd in ((0.0625, 0.10), (0.01, 0.30), (0.0025, 0.20)):
        _diag_records(root, f"val_cni_w_diag_{diag}", "val", diag, pgd)
    _diag_records(root, "cni_w_tuned", "test", 0.01, 0.25, n=400)
    report = render(spec, root)
    validation, _, test = report.partition("## CNI-W's noise parameters")[2].partition("test images:")
    rows = {line.split("|")[2].strip(): line for line in validation.splitlines() if line.startswith("| CNI-W |")}
    assert set(rows) == {"0.0625", "0.01", "0.0025"} and rows["0.01"].rstrip().endswith("| yes |")
    assert (
        "| CNI-W | 0.01 |" in test and "CNI-W (tuned diag_init) (`cni_w_tuned`): one weight draw per forward" in report
    )
    assert "- (a) CNI-W (tuned diag_init)" not in report  # measured now
    shutil.rmtree(root / "eval" / "cni_w_tuned")
    _diag_records(root, "cni_w_tuned", "test", 0.0625, 0.25, n=400)
    with pytest.raises(SpecError, match=r"the validation images choose diag_init = 0.01 for CNI-W"):
        render(spec, root)


TINY = {
    "val_cni_w_diag_0.01": ["smoothing.m_attack=1", "evaluation.votes_pgd.attack.steps=1", "data.test_subset=4"],
    "votes512_cni_w_tuned_sigma0": ["data.test_subset=2"],
    "transfer_cni_w": ["evaluation.transfer.attack.steps=1", "smoothing.n_vote=4", "data.test_subset=4"],
    "nattack_cni_w_tuned": ["evaluation.nattack.attack.iterations=2", "evaluation.nattack.attack.npop=4",
                            "evaluation.nattack.attack.pop_chunk=4", "evaluation.nattack.attack.check_every=1",
                            "smoothing.m_attack=1", "smoothing.n_vote=4", "data.test_subset=3"],
}  # fmt: skip


@pytest.mark.usefixtures("one_thread")
def test_the_added_evaluations_run_through_the_engine_and_fill_their_rows(tmp_path):
    """The validation run, the paper's vote sizes, the transfer attack from the source run's
    checkpoint and NAttack, each as the spec writes it (with small settings after the spec's), on
    one synthetic CNI-W model kept for the tuned and the source run: records on the validation or
    test images, the model's diag_init and one weight draw per forward pass in results.json, and
    their rows of the black-box table measured while the others stay not measured."""
    data = project_spec(tmp_path)
    model = tmp_path / "model"
    train(
        compose_config("train", [*QUIET, *RESNET, "model.backbone.noise=cni_w", "model.backbone.diag_init=0.01"], model)
    )
    for run in ("cni_w_diag_0.01", "cni_w_source"):
        target = Path(data["records"]) / "train" / run / "checkpoints"
        target.mkdir(parents=True)
        for ckpt in (model / "checkpoints").glob("best-*.ckpt"):
            shutil.copy(ckpt, target / ckpt.name)
    for key, extra in TINY.items():
        data["evaluations"][key]["overrides"] += [*extra, "trainer.enable_progress_bar=false"]
    spec = parse_spec("paper003", data)
    out, runner = tmp_path / "out", InProcessCommands()
    run_spec(spec, out, only=list(TINY), runner=runner)
    assert [c[1] for c in runner.calls] == ["evaluate.py"] * 4  # the kept checkpoints: no training
    evidence = Evidence(spec, out)
    for key in TINY:
        meta = evidence.meta(key)
        assert meta["noise_per"] == "forward" and meta["model_config"]["backbone"]["diag_init"] == 0.01
        assert meta["split"] == ("val" if key.startswith("val_") else "test")
    assert {"votes_majority_n256/correct", "votes_majority_n512/correct"} <= set(
        evidence.records("votes512_cni_w_tuned_sigma0")
    )
    assert evidence.meta("votes512_cni_w_tuned_sigma0")["smoothing"]["sigma"] == 0
    assert "transfer_source/correct" in evidence.records("transfer_cni_w")
    assert (evidence.records("nattack_cni_w_tuned")["nattack/queries"] > 0).all()
    table = next(s for s in spec.sections if s.get("title") == "## Black-box attacks")
    report = render(spec, out, (table,))
    measured = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    assert "not measured" not in measured["Transfer (plain source)"]
    nattack = [line for line in report.splitlines() if line.startswith("| NAttack |")]
    assert [("not measured" in line) for line in nattack] == [True, True, False]
    assert "Not measured yet (no records of `transfer_cni_w_smoothed_source`, `nattack_adv_resnet20`" in report
