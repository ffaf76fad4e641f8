"""The reproduction engine: specs run (resuming what a stopped run left), pieces joined as one run,
records kept, reports rendered from records alone and checked against the kept ones."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from safespot.paths import PROJECT_ROOT
from safespot.reproduce import blocks, cli
from safespot.reproduce.claims import evaluate_claim, size_verdict
from safespot.reproduce.engine import (
    Reproduction,
    adopt,
    adopt_evaluation,
    check_spec,
    keep,
    keep_evaluations,
    pending,
    relative_paths,
    render,
    run_spec,
    weights_digest,
)
from safespot.reproduce.evidence import Evidence
from safespot.reproduce.sections import SECTIONS
from safespot.reproduce.spec import SpecError, load_spec, parse_spec, spec_names
from safespot.stats import paired_difference
from safespot.utils.compose import compose_config

N = 40


def _spec(tmp_path: Path, **changes) -> dict:
    spec = {
        "title": "A toy reproduction",
        "report": str(tmp_path / "docs" / "report.md"),
        "records": str(tmp_path / "docs" / "records"),
        "runs": {"model": {"overrides": ["experiment=toy", "seed=0"], "keep_checkpoint": True}},
        "evaluations": {
            "grid": {"run": "model", "overrides": ["evaluation=[none,sfull]"], "pieces": 2},
        },
        "sections": [
            {"kind": "text", "text": "Measured {measured}; {n.grid} images."},
            {
                "kind": "table",
                "columns": ["Preempt.", "PGD"],
                "rows": [["None", "acc:grid/none_pgd/correct"], ["S-Full", "acc:grid/sfull_pgd/correct"]],
            },
            {
                "kind": "claims",
                "claims": [
                    {
                        "text": "S-Full minus None",
                        "a": "grid/sfull_pgd/correct",
                        "b": "grid/none_pgd/correct",
                        "paper": 30.0,
                    }
                ],
            },
            {"kind": "commands"},
        ],
        "blocks": {
            "summary": [
                {
                    "kind": "claims",
                    "claims": [{"text": "gain", "a": "grid/sfull_pgd/correct", "b": "grid/none_pgd/correct"}],
                }
            ]
        },
    }
    spec.update(changes)
    return spec


def _records(run_dir: Path, k: int, pieces: int) -> None:
    """What evaluate.py writes for piece k of ``pieces`` of the toy grid: records with a white-box
    style sweep whose worst budget differs between the pieces."""
    index = np.arange(N)[k * N // pieces : (k + 1) * N // pieces]
    rng = np.random.default_rng(k)
    records = pd.DataFrame({"index": index, "label": index % 3})
    records["clean/correct"] = True
    records["none_pgd/correct"] = index % 4 == 0
    records["sfull_pgd/correct"] = index % 4 != 1
    records["w_f0.5/correct"] = rng.random(len(index)) < 0.5
    records["w_f1/correct"] = rng.random(len(index)) < 0.5
    from safespot.evaluation.records import summarize

    names = ["clean", "none_pgd", "sfull_pgd", "w", "w_f0.5", "w_f1"]
    summary = summarize(records, names)
    run_dir.mkdir(parents=True)
    records.to_csv(run_dir / "records.csv", index=False)
    (run_dir / "results.json").write_text(json.dumps({**summary, "meta": {"evaluations": names, "groups": {}}}))
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("- evaluation=[none,sfull]\n")


class FakeCommands:
    """Stands in for train.py / evaluate.py: writes what they write into ``hydra.run.dir``."""

    def __init__(self, fail_at: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_at = fail_at

    def __call__(self, cmd: list[str], cwd: Path) -> None:
        self.calls.append(cmd)
        run_dir = cwd / next(c for c in cmd if c.startswith("hydra.run.dir=")).split("=", 1)[1]  # as Hydra
        if self.fail_at and self.fail_at in " ".join(cmd):
            run_dir.mkdir(parents=True)  # a run killed half-way
            (run_dir / "records.csv").write_text("index\n0\n")
            raise KeyboardInterrupt
        if cmd[1] == "train.py":
            (run_dir / "checkpoints").mkdir(parents=True)
            (run_dir / ".hydra").mkdir()  # as Hydra: the overrides it was given
            overrides = [c for c in cmd[2:] if not c.startswith("hydra.run.dir=")]
            (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
            weights, momentum = {"w": torch.arange(4.0)}, {"state": {0: {"momentum_buffer": torch.ones(4)}}}
            torch.save(
                {"epoch": 3, "state_dict": weights, "optimizer_states": [momentum], "lr_schedulers": [{}]},
                run_dir / "checkpoints" / "best-epoch003.ckpt",
            )
            (run_dir / "csv").mkdir()
            (run_dir / "csv" / "metrics.csv").write_text("epoch,val/acc\n0,0.5\n")
            return
        part = next((c for c in cmd if c.startswith("data.test_part=")), "data.test_part=[0,1]")
        k, pieces = (int(v) for v in part.split("=", 1)[1].strip("[]").split(","))
        _records(run_dir, k, pieces)
        ckpt = [c for c in cmd if c.startswith("ckpt_path=")]
        if ckpt:  # as evaluate.py: the checkpoint in the results and the overrides, as given
            results = json.loads((run_dir / "results.json").read_text())
            results["meta"]["ckpt_path"] = ckpt[0].split("=", 1)[1]
            (run_dir / "results.json").write_text(json.dumps(results))
        # as Hydra: the overrides it was given (the checkpoint first, then the spec's, then the piece)
        given = [c for c in cmd[2:] if not c.startswith("hydra.run.dir=")]
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in given))


def test_a_spec_runs_resumes_keeps_and_checks(tmp_path):
    spec = parse_spec("toy", _spec(tmp_path))
    out = tmp_path / "out"
    interrupted = FakeCommands(fail_at="data.test_part=[1,2]")
    with pytest.raises(KeyboardInterrupt):
        run_spec(spec, out, runner=interrupted)
    assert [c[1] for c in interrupted.calls] == ["train.py", "evaluate.py", "evaluate.py"]
    # a second call resumes: the training run and piece 0 are reused, piece 1 runs again aside of the stub
    resumed = FakeCommands()
    report = run_spec(spec, out, runner=resumed)
    assert len(resumed.calls) == 1 and "data.test_part=[1,2]" in resumed.calls[0]
    assert (out / "eval" / "grid" / "part1_of_2.interrupted" / "records.csv").is_file()
    ckpt = [c for c in resumed.calls[0] if c.startswith("ckpt_path=")]
    assert ckpt == [f"ckpt_path={out}/train/model/checkpoints/best-epoch003.ckpt"]
    text = report.read_text()
    assert "40 images" in text and "| None | 25.0 [14.2, 40.2] |" in text and "| S-Full | 75.0 [59.8, 85.8] |" in text
    assert "python evaluate.py ckpt_path=train/model/checkpoints/best-epoch003.ckpt" in text  # relative, no run dir
    assert "hydra.run.dir" not in text and str(tmp_path) not in text

    kept = keep(spec, out)
    assert (kept / "eval" / "grid" / "part0_of_2" / "records.csv").is_file()
    # no kept file names a directory of the machine that ran it: the checkpoint is named as it lies in the records
    results = json.loads((kept / "eval" / "grid" / "part0_of_2" / "results.json").read_text())
    assert results["meta"]["ckpt_path"] == "train/model/checkpoints/best-epoch003.ckpt"
    texts = [p.read_text() for p in kept.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml")]
    assert texts and not [t for t in texts if str(tmp_path) in t]
    # the kept checkpoint holds the weights, not the state only resuming the training needs
    source = torch.load(out / "train" / "model" / "checkpoints" / "best-epoch003.ckpt", weights_only=True)
    held = torch.load(kept / "train" / "model" / "checkpoints" / "best-epoch003.ckpt", weights_only=True)
    assert set(held) == {"epoch", "state_dict"} and {"optimizer_states", "lr_schedulers"} <= set(source)
    assert held["epoch"] == 3 and torch.equal(held["state_dict"]["w"], source["state_dict"]["w"])
    assert (kept / "train" / "model" / "metrics.csv").is_file()
    assert spec.report.read_text() == text  # the kept report is rendered from the kept records
    assert check_spec(spec) == []
    spec.report.write_text(text.replace("75.0 [59.8, 85.8]", "78.0 [59.8, 85.8]"))  # a hand edit
    (problem,) = check_spec(spec)
    assert "differs from its records" in problem and "-| S-Full | 78.0" in problem
    with pytest.raises(SpecError, match="already holds kept records"):
        keep(spec, out)
    # with the checkpoint kept, a later sitting evaluates it without training again
    later = FakeCommands()
    run_spec(spec, tmp_path / "later", runner=later)
    assert [c[1] for c in later.calls] == ["evaluate.py", "evaluate.py"]
    assert f"ckpt_path={kept}/train/model/checkpoints/best-epoch003.ckpt" in later.calls[0]


def test_a_stub_marked_pending_without_records_is_pending_not_a_failure(tmp_path, monkeypatch, capsys):
    """A report whose measurement is being redone is a stub with the line
    ``<!-- safespot-reproduce pending NAME -->``: check lists it as pending until records are kept."""
    spec = parse_spec("toy", _spec(tmp_path))
    spec.report.parent.mkdir(parents=True)
    spec.report.write_text("# A toy reproduction\n\nBeing measured again.\n")
    (problem,) = check_spec(spec)  # no records and no marker: a failure, as before
    assert "no kept records" in problem and not pending(spec)
    spec.report.write_text("# A toy reproduction\n\n<!-- safespot-reproduce pending other -->\n")
    assert check_spec(spec) and not pending(spec)  # another reproduction's marker
    stub = "# A toy reproduction\n\nBeing measured again: `make toy`.\n\n<!-- safespot-reproduce pending toy -->\n"
    spec.report.write_text(stub)
    assert pending(spec) and check_spec(spec) == []
    monkeypatch.setattr(cli, "load_spec", lambda name, overrides=None: spec)
    assert cli.main(["check", "toy"]) == 0
    assert "toy: pending (no kept records yet" in capsys.readouterr().out
    # once records are kept the stub is compared with them like any report
    keep(spec, run_spec(spec, tmp_path / "out", runner=FakeCommands()).parent)
    spec.report.write_text(stub)
    assert not pending(spec) and "differs from its records" in check_spec(spec)[0]
    assert cli.main(["check", "toy"]) == 1


def test_a_relative_out_from_another_directory_is_the_callers(tmp_path, monkeypatch, capsys):
    """``run --out runs/x`` typed outside the checkout runs into the caller's ``runs/x``, not the
    checkout's (the commands run in the checkout), and ``keep`` finds it there."""
    spec = parse_spec("toy", _spec(tmp_path))
    spec.report.parent.mkdir(parents=True)
    monkeypatch.setattr(cli, "load_spec", lambda name, overrides=None: spec)
    monkeypatch.setattr("safespot.reproduce.engine._subprocess", FakeCommands())
    caller = tmp_path / "elsewhere"
    caller.mkdir()
    monkeypatch.chdir(caller)
    assert cli.main(["run", "toy", "--out", f"runs/{tmp_path.name}"]) == 0
    assert (caller / "runs" / tmp_path.name / "report.md").is_file()
    assert not (PROJECT_ROOT / "runs" / tmp_path.name).exists()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["keep", "toy", f"elsewhere/runs/{tmp_path.name}"]) == 0
    assert spec.report.read_text() == (caller / "runs" / tmp_path.name / "report.md").read_text()


def test_pieces_render_as_one_run(tmp_path):
    """The evidence of an evaluation in pieces is the one run's: the budget sweep's minimum taken
    over all images, not per piece."""
    spec = parse_spec("toy", _spec(tmp_path))
    run_spec(spec, tmp_path / "out", runner=FakeCommands())
    evidence = Evidence(spec, tmp_path / "out")
    records = evidence.records("grid")
    accuracy = {f: records[f"w_f{f}/correct"].mean() for f in ("0.5", "1")}
    assert evidence.summary("grid")["w/acc"] == min(accuracy.values())
    assert records["w/correct"].mean() == min(accuracy.values())


def test_only_one_piece_runs_and_no_report_until_all_are_there(tmp_path, capsys):
    spec = parse_spec("toy", _spec(tmp_path))
    calls = FakeCommands()
    run_spec(spec, tmp_path / "out", only=["grid/1"], runner=calls)
    assert [c[1] for c in calls.calls] == ["train.py", "evaluate.py"] and "data.test_part=[1,2]" in calls.calls[1]
    assert "no report" in capsys.readouterr().out and not (tmp_path / "out" / "report.md").exists()
    with pytest.raises(SpecError, match=r"piece must be 0\.\.1"):
        run_spec(spec, tmp_path / "out", only=["grid/2"], runner=calls)


def test_generated_blocks_in_docs_are_rendered_and_checked(tmp_path, monkeypatch):
    spec = parse_spec("toy", _spec(tmp_path))
    out = tmp_path / "out"
    run_spec(spec, out, runner=FakeCommands())
    keep(spec, out)
    doc = tmp_path / "docs" / "guide.md"
    doc.write_text("Intro.\n<!-- safespot-reproduce toy summary -->\nstale\n<!-- end safespot-reproduce -->\nEnd.\n")
    monkeypatch.setattr(blocks, "documents", lambda: [doc])
    monkeypatch.setattr(blocks, "load_spec", lambda name: spec)
    monkeypatch.setattr(blocks, "PROJECT_ROOT", tmp_path)
    assert blocks.check_blocks() == ["docs/guide.md: a generated block differs from its records"]
    assert blocks.write_blocks() == [doc]
    text = doc.read_text()
    assert text.startswith("Intro.\n<!-- safespot-reproduce toy summary -->\n| Claim (same images) |")
    assert "| gain | +50.0 pp" in text and text.endswith("<!-- end safespot-reproduce -->\nEnd.\n")
    assert blocks.check_blocks() == []


def test_claims_kinds_sizes_and_restriction(tmp_path):
    spec = parse_spec("toy", _spec(tmp_path, smallest_effect=0.01))
    run_spec(spec, tmp_path / "out", runner=FakeCommands())
    evidence = Evidence(spec, tmp_path / "out")
    claim = {"text": "t", "a": "grid/sfull_pgd/correct", "b": "grid/none_pgd/correct"}
    assert evaluate_claim(evidence, claim).verdict == "holds"
    assert evaluate_claim(evidence, {**claim, "a": claim["b"], "b": claim["a"]}).verdict == "does not hold"
    same = evaluate_claim(evidence, {**claim, "a": claim["b"]})
    assert same.difference.low < 0 < same.difference.high and same.verdict == "inconclusive at this scale"
    assert evaluate_claim(evidence, {**claim, "a": claim["b"], "kind": "non_inferiority", "margin": 0.2}).verdict == (
        "holds"
    )
    # only the images where none_pgd is wrong: S-Full's accuracy there is 2/3, None's 0
    restricted = evaluate_claim(evidence, {**claim, "restrict": ["grid/clean/correct", "grid/sfull_pgd/correct"]})
    assert restricted.difference.n == 30 and restricted.difference.b_only == 0
    diff = paired_difference(np.r_[np.ones(60, bool), np.zeros(40, bool)], np.zeros(100, bool))
    assert diff.low > 0.49 and size_verdict(diff, 50.0) == "of the paper's size"
    assert (
        size_verdict(diff, 20.0) == "larger than the paper's" and size_verdict(diff, 90.0) == "smaller than the paper's"
    )
    section = {"kind": "claims", "title": "## Gains", "text": "Why these claims.", "claims": [{**claim, "paper": 30.0}]}
    lines = SECTIONS["claims"](evidence, section)
    assert lines[:4] == ["## Gains", "", "Why these claims.", ""] and "\n| t |" in lines[4]
    # readings: the sentence of the size measured first, else of the verdict; none for other outcomes
    words = {"larger than the paper's": "Larger.", "of the paper's size": "Same size.", "holds": "Holds."}
    inconclusive = {**claim, "a": claim["b"], "readings": {"holds": "Never."}}
    claims = [{**claim, "paper": 30.0, "readings": words}, {**claim, "readings": words}, inconclusive]
    lines = SECTIONS["claims"](evidence, {"kind": "claims", "claims": claims})
    assert lines[2:] == ["Larger. Holds.", ""]


def test_spec_errors_are_one_line_before_any_run(tmp_path):
    with pytest.raises(SpecError, match="not a run of the spec"):
        parse_spec("toy", _spec(tmp_path, evaluations={"e": {"run": "nope"}}))
    with pytest.raises(SpecError, match="command must be one of"):
        parse_spec("toy", _spec(tmp_path, evaluations={"e": {"run": "model", "command": "train"}}))
    with pytest.raises(SpecError, match="no reproduction named 'nope'"):
        load_spec("nope")
    spec = parse_spec("toy", _spec(tmp_path, sections=[{"kind": "pie_chart"}]))
    run_spec_out = tmp_path / "out"
    with pytest.raises(SpecError, match="no section kind 'pie_chart'"):
        run_spec(spec, run_spec_out, runner=FakeCommands())
    spec = parse_spec("toy", _spec(tmp_path, sections=[{"kind": "table", "columns": ["a"], "rows": [["acc:grid/x"]]}]))
    with pytest.raises(SpecError, match="has no field 'x'"):
        render(spec, run_spec_out)


def test_every_spec_of_the_project_loads():
    names = spec_names()
    assert "smoothed" in names
    for name in names:
        spec = load_spec(name)
        assert spec.report is not None and spec.records is not None, name
        assert spec.sections and {s["kind"] for s in spec.sections} <= set(SECTIONS), name


def test_keep_only_adds_one_evaluation_and_leaves_the_rest_as_kept(tmp_path):
    """``run --only KEY`` then ``keep --only KEY``: the evaluation joins the kept records; the other
    kept evaluations, checkpoints and log lines stay; one the spec names that neither holds stays
    unmeasured."""
    raw = _spec(tmp_path)
    raw["evaluations"]["extra"] = {"run": "model", "overrides": ["evaluation=[none,sfull]", "seed=1"]}
    raw["evaluations"]["later"] = {"run": "model", "overrides": ["evaluation=[none,sfull]", "seed=2"]}
    spec = parse_spec("toy", raw)
    first = tmp_path / "first"
    run_spec(spec, first, only=["grid"], runner=FakeCommands())
    with pytest.raises(SpecError, match="has not finished"):
        keep(spec, first)  # a whole keep still wants every evaluation
    with pytest.raises(SpecError, match="holds no kept records"):
        keep_evaluations(spec, first, ["grid"])
    with pytest.raises(SpecError, match="does not exist"):
        keep_evaluations(spec, tmp_path / "nowhere", ["grid"])
    # the kept records of the first sitting, as an earlier keep left them (grid only)
    spec.records.mkdir(parents=True)
    for folder in ("train", "eval", "log.jsonl"):
        source = first / folder
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, spec.records / folder)
    relative_paths(spec.records, {first: ""})
    before = (spec.records / "eval" / "grid" / "part0_of_2" / "records.csv").read_bytes()
    second = tmp_path / "second"
    run_spec(spec, second, only=["extra"], runner=FakeCommands())
    with pytest.raises(SpecError, match="has not finished evaluation 'later'"):
        keep_evaluations(spec, second, ["later"])
    kept = keep_evaluations(spec, second, ["extra"])
    assert (kept / "eval" / "extra" / "records.csv").is_file()
    assert (kept / "eval" / "grid" / "part0_of_2" / "records.csv").read_bytes() == before
    assert not (kept / "eval" / "later").exists()
    keys = [json.loads(line)["key"] for line in (kept / "log.jsonl").read_text().splitlines()]
    assert "eval/extra" in keys and "eval/grid/part0_of_2" in keys and "train/model" in keys
    texts = [p.read_text() for p in kept.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml")]
    assert not [t for t in texts if str(second) in t]
    assert spec.report.read_text() == render(spec, kept) and check_spec(spec) == []


def _earlier_run(folder: Path, overrides: list[str]) -> Path:
    """A finished train.py run directory as Hydra and the checkpoint callback leave it."""
    from omegaconf import OmegaConf

    from safespot.utils.compose import compose_config

    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose_config("train", overrides, folder), folder / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), folder / ".hydra" / "overrides.yaml")
    (folder / "checkpoints").mkdir()
    epochs = OmegaConf.load(folder / ".hydra" / "config.yaml").trainer.max_epochs
    for name in ("best-epoch014.ckpt", "last.ckpt"):  # as Lightning writes them after the last epoch
        torch.save({"epoch": epochs - 1, "state_dict": {}}, folder / "checkpoints" / name)
    return folder


def test_an_earlier_run_with_the_specs_settings_is_adopted_instead_of_trained(tmp_path):
    run = ["experiment=cifar10_natural", "scale=reduced_preact", "seed=0"]
    spec = parse_spec("toy", _spec(tmp_path, runs={"model": {"overrides": run}}))
    neutral = ["logger=csv", "data.test_subset=2000", "data.num_workers=0"]  # they leave the weights as they are
    earlier = _earlier_run(tmp_path / "earlier", [*run, *neutral])
    before = sorted(p.relative_to(earlier) for p in earlier.rglob("*"))
    out = tmp_path / "out"
    adopt(spec, "model", earlier, out)
    assert sorted(p.relative_to(earlier) for p in earlier.rglob("*")) == before  # copied, not moved
    calls = FakeCommands()
    run_spec(spec, out, runner=calls)
    assert [c[1] for c in calls.calls] == ["evaluate.py", "evaluate.py"]  # nothing trained
    assert all(f"ckpt_path={out / 'train' / 'model' / 'checkpoints' / 'best-epoch014.ckpt'}" in c for c in calls.calls)
    report = render(spec, out)
    assert "python train.py " + " ".join([*run, *neutral]) + "    # an earlier run, adopted" in report
    with pytest.raises(SpecError, match="already holds its run 'model'"):
        adopt(spec, "model", earlier, out)
    # a training run of another reproduction brings the minutes that reproduction logged
    other = _earlier_run(tmp_path / "other" / "train" / "model", run)
    (tmp_path / "other" / "log.jsonl").write_text(json.dumps({"key": "train/model", "minutes": 34.0}) + "\n")
    adopt(spec, "model", other, tmp_path / "out2")
    assert json.loads((tmp_path / "out2" / "log.jsonl").read_text())["minutes"] == 34.0


@pytest.mark.parametrize(
    "change, message",
    [
        (["seed=1"], "seed: 1 there, 0 in the spec"),
        (["trainer.max_epochs=8"], "trainer.max_epochs: 8 there, 15 in the spec"),
        (["model.backbone.width=32"], "model.backbone.width: 32 there, 16 in the spec"),
    ],
)
def test_an_earlier_run_with_other_settings_is_refused(tmp_path, change, message):
    run = ["experiment=cifar10_natural", "scale=reduced_preact", "seed=0"]
    spec = parse_spec("toy", _spec(tmp_path, runs={"model": {"overrides": run}}))
    earlier = _earlier_run(tmp_path / "earlier", [*run, *change])
    with pytest.raises(SpecError, match=message.replace(".", r"\.")):
        adopt(spec, "model", earlier, tmp_path / "out")
    assert not (tmp_path / "out" / "train").exists()


def test_an_unfinished_or_unknown_run_is_not_adopted(tmp_path):
    run = ["experiment=cifar10_natural", "scale=reduced_preact", "seed=0"]
    spec = parse_spec("toy", _spec(tmp_path, runs={"model": {"overrides": run}}))
    earlier = _earlier_run(tmp_path / "earlier", run)
    with pytest.raises(SpecError, match="no training run 'other'"):
        adopt(spec, "other", earlier, tmp_path / "out")
    with pytest.raises(SpecError, match="not a training run directory"):
        adopt(spec, "model", earlier / "checkpoints", tmp_path / "out")
    torch.save({"epoch": 6, "state_dict": {}}, earlier / "checkpoints" / "last.ckpt")  # a run still training
    with pytest.raises(SpecError, match="its last checkpoint is of epoch 7 of 15"):
        adopt(spec, "model", earlier, tmp_path / "out")
    (earlier / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(SpecError, match="has not finished training"):
        adopt(spec, "model", earlier, tmp_path / "out")
    assert not (tmp_path / "out" / "train").exists()


def test_a_run_kept_by_another_reproduction_is_adopted_with_its_kept_checkpoint(tmp_path):
    """The reduced family's models are shared: a run kept in one reproduction's records (weights
    only, no config) is adopted by another whose run has the same settings, not trained again."""
    run = ["experiment=cifar10_natural", "scale=reduced_preact", "seed=0"]
    first = parse_spec("first", _spec(tmp_path / "a", runs={"model": {"overrides": run, "keep_checkpoint": True}}))
    run_spec(first, tmp_path / "first", runner=FakeCommands())
    kept = keep(first, tmp_path / "first") / "train" / "model"
    assert not (kept / ".hydra" / "config.yaml").exists()
    before = sorted((p.relative_to(kept), p.read_bytes()) for p in kept.rglob("*") if p.is_file())
    neutral = ["logger=csv", "data.num_workers=0"]
    spec = parse_spec("second", _spec(tmp_path / "b", runs={"model": {"overrides": [*run, *neutral]}}))
    out = tmp_path / "out"
    adopt(spec, "model", kept, out)
    assert sorted((p.relative_to(kept), p.read_bytes()) for p in kept.rglob("*") if p.is_file()) == before
    calls = FakeCommands()
    run_spec(spec, out, runner=calls)
    assert [c[1] for c in calls.calls] == ["evaluate.py", "evaluate.py"]  # nothing trained
    ckpt = out / "train" / "model" / "checkpoints" / "best-epoch003.ckpt"
    assert all(f"ckpt_path={ckpt}" in c for c in calls.calls)
    assert torch.equal(torch.load(ckpt, weights_only=True)["state_dict"]["w"], torch.arange(4.0))
    assert "python train.py " + " ".join(run) + "    # an earlier run, adopted" in render(spec, out)
    # other settings, a checkpoint the spec evaluates that the records do not keep, or a folder no
    # reproduction's log names: refused before anything is copied
    other = parse_spec("third", _spec(tmp_path / "c", runs={"model": {"overrides": [*run[:2], "seed=1"]}}))
    with pytest.raises(SpecError, match="seed: 0 there, 1 in the spec"):
        adopt(other, "model", kept, tmp_path / "out2")
    grid = {"run": "model", "checkpoint": "last", "overrides": ["evaluation=[none,sfull]"]}
    last = parse_spec("fourth", _spec(tmp_path / "d", runs={"model": {"overrides": run}}, evaluations={"grid": grid}))
    with pytest.raises(SpecError, match="keeps no last checkpoint, which fourth evaluates"):
        adopt(last, "model", kept, tmp_path / "out2")
    stray = tmp_path / "stray" / "train" / "model"
    shutil.copytree(kept, stray)
    with pytest.raises(SpecError, match="nor a kept run"):
        adopt(spec, "model", stray, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_an_evaluation_another_reproduction_ran_is_adopted_only_when_it_is_the_same(tmp_path, monkeypatch):
    """Same command and overrides but the checkpoint's path, the same weights, the same pieces:
    its records are the spec's evaluation, nothing runs again; any difference is refused."""
    run = ["experiment=cifar10_natural", "scale=reduced_preact", "seed=0"]
    runs = {"model": {"overrides": run, "keep_checkpoint": True}}
    first = parse_spec("first", _spec(tmp_path / "a", runs=runs))
    run_spec(first, tmp_path / "first", runner=FakeCommands())
    kept = keep(first, tmp_path / "first")
    second = parse_spec("second", _spec(tmp_path / "b", runs=runs))
    out = tmp_path / "out"
    with pytest.raises(SpecError, match="adopt or train it first"):
        adopt_evaluation(second, "grid", kept / "eval" / "grid", out)
    adopt(second, "model", kept / "train" / "model", out)
    adopt_evaluation(second, "grid", kept / "eval" / "grid", out)
    calls = FakeCommands()
    run_spec(second, out, runner=calls)
    assert calls.calls == []  # nothing trained, nothing evaluated
    pd.testing.assert_frame_equal(Evidence(second, out).records("grid"), Evidence(first, kept).records("grid"))
    assert Evidence(second, out).summary("grid") == Evidence(first, kept).summary("grid")
    assert "# an earlier run, adopted" in render(second, out).split("evaluate.py")[1]
    with pytest.raises(SpecError, match="already holds its evaluation 'grid'"):
        adopt_evaluation(second, "grid", kept / "eval" / "grid", out)
    # other overrides, other pieces, other weights: refused, nothing copied
    for changed, message in (
        ({"overrides": ["evaluation=[none]"], "pieces": 2}, "its overrides differ in"),
        ({"pieces": 1}, "is not in the 1 piece"),
    ):
        other = parse_spec("other", _spec(tmp_path / "c", runs=runs, evaluations={"grid": {"run": "model", **changed}}))
        elsewhere = tmp_path / f"out-{changed}"
        adopt(other, "model", kept / "train" / "model", elsewhere)
        with pytest.raises(SpecError, match=message):
            adopt_evaluation(other, "grid", kept / "eval" / "grid", elsewhere)
        assert not (elsewhere / "eval").exists()
    # a kept record names its checkpoint relative to the checkout that keeps it, never to this one
    # or to the working directory (where a file of that name may hold other weights)
    piece = kept / "eval" / "grid" / "part0_of_2"
    stored = (piece / ".hydra" / "overrides.yaml").read_text()
    assert "- ckpt_path=train/model/checkpoints/best-epoch003.ckpt\n" in stored
    (piece / ".hydra" / "overrides.yaml").write_text(stored.replace("ckpt_path=", "ckpt_path=docs/records/"))
    decoy = tmp_path / "decoy" / "docs" / "records" / "train" / "model" / "checkpoints"
    decoy.mkdir(parents=True)
    torch.save({"epoch": 3, "state_dict": {"w": torch.zeros(4)}}, decoy / "best-epoch003.ckpt")
    monkeypatch.chdir(tmp_path / "decoy")
    moved = tmp_path / "moved"
    adopt(second, "model", kept / "train" / "model", moved)
    adopt_evaluation(second, "grid", kept / "eval" / "grid", moved)
    evaluated = (moved / "eval" / "grid" / "part0_of_2" / ".hydra" / "overrides.yaml").read_text()
    assert f"ckpt_path={(kept / 'train' / 'model' / 'checkpoints' / 'best-epoch003.ckpt').resolve()}" in evaluated
    # made by another command: refused
    log = (kept / "log.jsonl").read_text()
    (kept / "log.jsonl").write_text(log.replace("python evaluate.py", "python ood.py"))
    with pytest.raises(SpecError, match=r"was made by ood\.py, not evaluate\.py"):
        adopt_evaluation(second, "grid", kept / "eval" / "grid", tmp_path / "other-command")
    (kept / "log.jsonl").write_text(log)
    retrained = tmp_path / "retrained"
    adopt(second, "model", kept / "train" / "model", retrained)
    ckpt = retrained / "train" / "model" / "checkpoints" / "best-epoch003.ckpt"
    torch.save({"epoch": 3, "state_dict": {"w": torch.zeros(4)}}, ckpt)
    with pytest.raises(SpecError, match="did not evaluate the weights of 'model'"):
        adopt_evaluation(second, "grid", kept / "eval" / "grid", retrained)


def test_each_kept_evaluation_names_the_weights_it_measured(tmp_path):
    """An evaluation's log line holds the digest of the weights it ran on: a kept checkpoint
    replaced afterwards fails the check, and an evaluation is adopted by the weights it measured,
    not by the other reproduction's checkpoint file as it is now."""
    ckpt = tmp_path / "a.ckpt"
    torch.save({"epoch": 1, "state_dict": {"w": torch.arange(4.0)}, "optimizer_states": [{}]}, ckpt)
    stripped = tmp_path / "b.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4.0)}}, stripped)
    near = tmp_path / "c.ckpt"
    torch.save({"state_dict": {"w": torch.tensor([0.0, 1.0, 2.0, 3.0000002])}}, near)
    cast = tmp_path / "d.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4.0, dtype=torch.float64)}}, cast)
    assert weights_digest(ckpt) == weights_digest(stripped)  # the weights, not the file
    assert len({weights_digest(ckpt), weights_digest(near), weights_digest(cast)}) == 3

    run = ["experiment=cifar10_natural", "scale=reduced_preact", "seed=0"]
    runs = {"model": {"overrides": run, "keep_checkpoint": True}}
    first = parse_spec("first", _spec(tmp_path / "a", runs=runs))
    out = tmp_path / "first"
    run_spec(first, out, runner=FakeCommands())
    trained = weights_digest(out / "train" / "model" / "checkpoints" / "best-epoch003.ckpt")
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e.get("weights") for e in logged] == [None, trained, trained]  # the training logs none
    # a log written without them (an earlier engine) gets them when kept
    unnamed = [{k: v for k, v in e.items() if k != "weights"} for e in logged]
    (out / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in unnamed))
    kept = keep(first, out)
    kept_log = [json.loads(line) for line in (kept / "log.jsonl").read_text().splitlines()]
    assert [e.get("weights") for e in kept_log] == [None, trained, trained]
    assert check_spec(first) == []
    # the kept checkpoint replaced by other weights: its evaluations no longer measure it
    held = kept / "train" / "model" / "checkpoints" / "best-epoch003.ckpt"
    torch.save({"epoch": 3, "state_dict": {"w": torch.zeros(4)}}, held)
    problems = check_spec(first)
    assert len(problems) == 2 and all("measured the weights" in p for p in problems)
    # adopted with it, the replaced model is not the one the evaluation measured: refused
    second = parse_spec("second", _spec(tmp_path / "b", runs=runs))
    adopt(second, "model", kept / "train" / "model", tmp_path / "out")
    with pytest.raises(SpecError, match="did not evaluate the weights of 'model'"):
        adopt_evaluation(second, "grid", kept / "eval" / "grid", tmp_path / "out")


def test_safe_spot_awares_adv_and_sfgsm_adv_are_cifar10_linfs(tmp_path, capsys):
    """The kept records of cifar10_linf hold safe_spot_aware's ADV and S-FGSM+ADV runs and grids:
    adopted through the CLI, only S-PGD+ADV is left to train and evaluate."""
    if not (load_spec("cifar10_linf").records / "eval" / "adv" / "part7_of_8").is_dir():
        pytest.fail("cifar10_linf's kept records are incomplete")
    out = tmp_path / "out"
    for key, source in (
        ("adv", "train/adv"),
        ("sfgsm_adv", "train/preemptive"),
        ("adv", "eval/adv"),
        ("sfgsm_adv", "eval/preemptive"),
    ):
        path = str(PROJECT_ROOT / "docs" / "records" / "cifar10_linf" / source)
        assert cli.main(["adopt", "safe_spot_aware", key, path, "--out", str(out)]) == 0, capsys.readouterr().err
    spec = load_spec("safe_spot_aware")
    evidence = Evidence(spec, out)
    assert [k for k in spec.evaluations if not evidence.has(k)] == ["spgd_adv"]
    linf = Evidence(load_spec("cifar10_linf"), load_spec("cifar10_linf").records)
    pd.testing.assert_frame_equal(evidence.records("sfgsm_adv"), linf.records("preemptive"))


def test_the_cli_adopts_a_run_of_a_project_spec(tmp_path, capsys):
    natural = load_spec("cifar10_linf").runs["natural"].overrides
    earlier = _earlier_run(tmp_path / "earlier", [*natural, "logger=csv"])
    out = tmp_path / "out"
    assert cli.main(["adopt", "cifar10_linf", "natural", str(earlier), "--out", str(out)]) == 0
    assert (out / "train" / "natural" / "checkpoints" / "last.ckpt").is_file()
    assert cli.main(["keep", "cifar10_linf", str(out), "--only", "natural", "--replace"]) == 2
    assert "without --replace" in capsys.readouterr().err
    assert cli.main(["adopt", "cifar10_linf", "adv", str(earlier), "--out", str(out)]) == 2
    assert "is not cifar10_linf's run 'adv'" in capsys.readouterr().err


def test_the_models_section_reads_each_runs_training_log(tmp_path):
    spec = parse_spec("toy", _spec(tmp_path, runs={"model": {"overrides": ["experiment=toy"]}}))
    out = tmp_path / "out"
    run_spec(spec, out, runner=FakeCommands())  # evaluated at best-epoch003.ckpt
    run = out / "train" / "model"
    rows = ["epoch,val/acc,val/robust_acc,test/acc,test/robust_acc"]
    rows += [f"{e},{0.5 + e / 100},{0.3 + e / 100},," for e in range(6)] + ["6,,,0.675,0.38"]
    (run / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    (run / ".hydra").mkdir(exist_ok=True)
    (run / ".hydra" / "overrides.yaml").write_text("- experiment=toy\n- data.test_subset=2000\n")
    section = {"kind": "training_runs", "models": {"Toy": "grid"}}
    table = SECTIONS["training_runs"](Evidence(spec, out), section)[0]
    # 6 epochs (0-5), the 4th evaluated; 1350 of 2000: Wilson [65.41, 69.52], 760 of 2000: [35.90, 40.15]
    assert "| Toy | 6 | 4 | 53.0 | 33.0 | 2,000 | 67.5 [65.4, 69.5] | 38.0 [35.9, 40.1] |" in table
    (run / ".hydra" / "overrides.yaml").write_text("- experiment=toy\n")  # the whole test split
    table = SECTIONS["training_runs"](Evidence(spec, out), {**section, "test_images": 10_000})[0]
    assert "| 10,000 | 67.5 [66.6, 68.4] |" in table
    assert "at x_r" not in table  # no preemptive model: no safe-spot columns
    rows[1:] = [r + ",0.1" if r.count(",") == 4 and not r.startswith("6,") else r for r in rows[1:]]
    (run / "csv" / "metrics.csv").write_text("\n".join([rows[0] + ",val/safe_robust_acc", *rows[1:]]) + "\n")
    table = SECTIONS["training_runs"](Evidence(spec, out), section)[0]
    assert table.splitlines()[0].endswith("| Val robust at x_r | Test robust at x_r |") and "| 10.0 | – |" in table


def test_a_partial_keep_holds_what_has_finished_and_the_rest_is_added_later(tmp_path, capsys):
    """``keep --partial``: the finished trainings (with their checkpoints) and evaluations are kept,
    an unfinished run is not, the report stays a pending stub; a later sitting evaluates from the
    kept checkpoint, trains what is missing, and ``keep --only`` completes the records and renders
    the report."""
    raw = _spec(tmp_path)
    raw["runs"]["other"] = {"overrides": ["experiment=toy", "seed=1"], "keep_checkpoint": True}
    raw["evaluations"]["extra"] = {"run": "other", "overrides": ["evaluation=[none,sfull]"]}
    raw["blocks"]["extra"] = [
        {"kind": "claims", "claims": [{"text": "e", "a": "extra/sfull_pgd/correct", "b": "grid/none_pgd/correct"}]}
    ]
    spec = parse_spec("toy", raw)
    spec.report.parent.mkdir(parents=True)
    stub = "# A toy reproduction\n\nBeing measured.\n\n<!-- safespot-reproduce pending toy -->\n"
    spec.report.write_text(stub)
    first = tmp_path / "first"
    with pytest.raises(SpecError, match="finished no run"):
        keep(spec, first, partial=True)
    run_spec(spec, first, only=["grid"], runner=FakeCommands())
    (first / "train" / "other" / "checkpoints").mkdir(parents=True)  # a training stopped half-way
    with pytest.raises(SpecError, match="--partial keeps what it has"):
        keep(spec, first)
    kept = keep(spec, first, partial=True)
    assert (kept / "train" / "model" / "checkpoints" / "best-epoch003.ckpt").is_file()
    assert not (kept / "train" / "other").exists() and not (kept / "eval" / "extra").exists()
    assert spec.report.read_text() == stub and pending(spec) and check_spec(spec) == []
    # a doc block renders once the evaluations it reads are kept
    assert "| gain |" in blocks.render_block(spec, "summary")
    assert blocks.render_block(spec, "extra").startswith("Not measured yet") and "Kept so far: grid" in (
        blocks.render_block(spec, "extra")
    )
    # a later sitting: grid's model is not trained again, the missing run is
    calls = FakeCommands()
    second = tmp_path / "second"
    run_spec(spec, second, only=["grid", "extra"], runner=calls)
    trained = [c for c in calls.calls if c[1] == "train.py"]
    assert len(trained) == 1 and "seed=1" in trained[0]
    keep_evaluations(spec, second, ["extra"])
    assert (kept / "train" / "other" / "checkpoints" / "best-epoch003.ckpt").is_file()
    keys = [json.loads(line)["key"] for line in (kept / "log.jsonl").read_text().splitlines()]
    assert sorted(keys) == ["eval/extra", "eval/grid/part0_of_2", "eval/grid/part1_of_2", "train/model", "train/other"]
    assert not pending(spec) and spec.report.read_text() == render(spec, kept) and check_spec(spec) == []


def test_pieces_kept_over_sittings_are_not_run_again_and_join_as_one_run(tmp_path, capsys):
    """A long evaluation accumulates: each sitting keeps the pieces it finished (``keep --only KEY
    --partial``), the next runs only the others, and the joined records and report equal one
    uninterrupted run's."""
    raw = _spec(tmp_path)
    raw["evaluations"]["grid"]["pieces"] = 3
    spec = parse_spec("toy", raw)
    spec.report.parent.mkdir(parents=True)
    spec.report.write_text("# A toy reproduction\n\n<!-- safespot-reproduce pending toy -->\n")
    whole = tmp_path / "whole"
    run_spec(spec, whole, runner=FakeCommands())
    # sitting 1: the training and piece 0, kept
    first = tmp_path / "first"
    run_spec(spec, first, only=["grid/0"], runner=FakeCommands())
    keep(spec, first, partial=True)
    # sitting 2: piece 1; keeping it alone needs --partial (piece 2 is nowhere yet)
    second, calls = tmp_path / "second", FakeCommands()
    run_spec(spec, second, only=["grid/1"], runner=calls)
    assert [c[1] for c in calls.calls] == ["evaluate.py"]  # the kept checkpoint, not a new training
    with pytest.raises(SpecError, match="lacks part2_of_3"):
        keep_evaluations(spec, second, ["grid"])
    keep_evaluations(spec, second, ["grid"], partial=True)
    assert pending(spec) and check_spec(spec) == []
    assert "not yet: grid (2 of 3 pieces)." in blocks.render_block(spec, "summary")
    # sitting 3: the whole evaluation asked for, only the piece not kept runs
    third, calls = tmp_path / "third", FakeCommands()
    run_spec(spec, third, only=["grid"], runner=calls)
    assert len(calls.calls) == 1 and "data.test_part=[2,3]" in calls.calls[0]
    assert "kept: eval/grid/part0_of_3 (not run again)" in capsys.readouterr().out
    kept = keep_evaluations(spec, third, ["grid"])
    keys = sorted(json.loads(line)["key"] for line in (kept / "log.jsonl").read_text().splitlines())
    assert keys == ["eval/grid/part0_of_3", "eval/grid/part1_of_3", "eval/grid/part2_of_3", "train/model"]
    assert not pending(spec) and check_spec(spec) == []
    joined, one = Evidence(spec, kept), Evidence(spec, whole)
    pd.testing.assert_frame_equal(joined.records("grid"), one.records("grid"))
    assert joined.summary("grid") == one.summary("grid")
    table = spec.report.read_text().partition("| Preempt.")[2].partition("\n\n")[0]
    assert table and table == render(spec, whole).partition("| Preempt.")[2].partition("\n\n")[0]


def test_kept_records_name_no_directory_of_the_machine_that_ran_them(tmp_path):
    """A kept record naming an absolute path fails the check; a path into another checkout's kept
    records is kept relative to the checkout (pieces run in another worktree)."""
    spec = parse_spec("toy", _spec(tmp_path))
    run_spec(spec, tmp_path / "out", runner=FakeCommands())
    keep(spec, tmp_path / "out")
    assert check_spec(spec) == []
    piece = spec.records / "eval" / "grid" / "part0_of_2" / ".hydra" / "overrides.yaml"
    elsewhere = "/elsewhere/checkout/docs/records/toy/train/model/checkpoints/best.ckpt"
    piece.write_text(piece.read_text() + f"- ckpt_path={elsewhere}\n")
    problems = check_spec(spec)
    assert len(problems) == 1 and elsewhere in problems[0] and "an absolute path in a kept record" in problems[0]
    relative_paths(spec.records, {})
    assert "- ckpt_path=docs/records/toy/train/model/checkpoints/best.ckpt\n" in piece.read_text()
    assert check_spec(spec) == []


def test_the_old_to_new_rows_read_new_values_from_the_reports_tables(tmp_path):
    """docs/reproduction.md's "Verdicts re-measured": "old" is history typed in the spec, "new" is
    read from the table a section renders from the records, "pending" until they are kept."""
    row = {"claim": "S-Full beats None", "old": "+40.0 pp, holds", "section": 2, "row": ["S-Full minus None"],
           "changed": "re-run"}  # fmt: skip
    raw = _spec(tmp_path)
    raw["blocks"]["remeasured"] = [{"kind": "remeasured", "rows": [row]}]
    spec = parse_spec("toy", raw)
    pending_table = blocks.render_block(spec, "remeasured")  # no records kept yet
    assert "| S-Full beats None | +40.0 pp, holds | pending | re-run |" in pending_table
    run_spec(spec, tmp_path / "out", runner=FakeCommands())
    keep(spec, tmp_path / "out")
    claim = next(r for r in SECTIONS["claims"](Evidence(spec, spec.records), spec.sections[2])[0].splitlines()[2:])
    difference, verdict, _, size = (c.strip() for c in claim.strip("|").split("|")[1:])
    new = f"{difference.split(', McNemar')[0]}, {verdict}, {size}"
    assert f"| S-Full beats None | +40.0 pp, holds | {new} | re-run |" in blocks.render_block(spec, "remeasured")
    assert new.startswith("+50.0 pp [")
    # kept in part: a row whose section cannot render yet is pending, not an error
    partial = _spec(tmp_path / "partial")
    partial["evaluations"]["extra"] = {"run": "model", "overrides": ["evaluation=[none,sfull]", "seed=1"]}
    partial["sections"][2]["claims"].append(
        {"text": "extra", "a": "extra/sfull_pgd/correct", "b": "grid/none_pgd/correct"}
    )
    partial["blocks"]["remeasured"] = [{"kind": "remeasured", "rows": [row]}]
    spec_in_part = parse_spec("toy", partial)
    spec_in_part.report.parent.mkdir(parents=True)
    spec_in_part.report.write_text("# A toy reproduction\n\n<!-- safespot-reproduce pending toy -->\n")
    run_spec(spec_in_part, tmp_path / "in-part", only=["grid"], runner=FakeCommands())
    keep(spec_in_part, tmp_path / "in-part", partial=True)
    assert "| S-Full beats None | +40.0 pp, holds | pending | re-run |" in blocks.render_block(
        spec_in_part, "remeasured"
    )
    raw["blocks"]["remeasured"][0]["rows"][0]["row"] = ["S-Full minus nothing"]
    with pytest.raises(SpecError, match="found 0 times"):
        blocks.render_block(parse_spec("toy", raw), "remeasured")


class FakeEpochs(FakeCommands):
    """train.py run epoch by epoch (evaluate.py as :class:`FakeCommands`): ``last.ckpt`` at each
    epoch's end with weights that are a function of the epoch (as an exact resume leaves them), the
    best checkpoint at epoch 1, one ``csv/metrics.csv`` row per epoch; a run given ``ckpt_path``
    starts after that checkpoint's epoch and carries its best checkpoint over (as
    :class:`safespot.utils.callbacks.ModelCheckpoint` does); killed after ``stop_after`` epochs,
    in the middle of the next one (its row written, its checkpoint not)."""

    EPOCHS = 4

    def __init__(self, stop_after: int | None = None) -> None:
        super().__init__()
        self.stop_after = stop_after

    def __call__(self, cmd: list[str], cwd: Path) -> None:
        if cmd[1] != "train.py":
            return super().__call__(cmd, cwd)
        self.calls.append(cmd)
        run_dir = cwd / next(c for c in cmd if c.startswith("hydra.run.dir=")).split("=", 1)[1]  # as Hydra
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / ".hydra").mkdir()
        overrides = [c for c in cmd[2:] if not c.startswith("hydra.run.dir=")]
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        config = compose_config("train", [o for o in overrides if not o.startswith("ckpt_path=")], run_dir)
        config.ckpt_path = next((o.split("=", 1)[1] for o in overrides if o.startswith("ckpt_path=")), None)
        OmegaConf.save(config, run_dir / ".hydra" / "config.yaml")  # as Hydra: the config it ran with
        given = [Path(c.split("=", 1)[1]) for c in cmd if c.startswith("ckpt_path=")]
        start = torch.load(given[-1], weights_only=True)["epoch"] + 1 if given else 0
        for best in given[-1].parent.glob("best-*.ckpt") if given else []:
            shutil.copy2(best, run_dir / "checkpoints" / best.name)
        rows = ["epoch,val/acc"]
        for n, epoch in enumerate(range(start, self.EPOCHS)):
            rows.append(f"{epoch},{epoch / 10}")
            (run_dir / "csv").mkdir(exist_ok=True)
            (run_dir / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
            if n == self.stop_after:
                raise KeyboardInterrupt
            state = {"epoch": epoch, "state_dict": {"w": torch.full((4,), float(epoch))}, "optimizer_states": [{}]}
            torch.save(state, run_dir / "checkpoints" / "last.ckpt")
            if epoch == 1:
                torch.save(state, run_dir / "checkpoints" / "best-epoch001.ckpt")


def test_an_interrupted_training_resumes_from_its_last_checkpoint_within_and_across_sittings(tmp_path):
    """A training stopped mid-way resumes after its last finished epoch: in its reproduction's
    directory (the interrupted run set aside), and in a later sitting from the unfinished training
    ``keep --partial`` kept; the kept run's metrics hold every epoch once, its best checkpoint is
    the one before the resumes, and the unfinished training leaves the records once it finishes.
    A run set aside with other settings is not resumed."""
    raw = _spec(tmp_path)
    raw["runs"]["model"]["overrides"] = ["experiment=quickstart", "seed=0"]
    spec = parse_spec("toy", raw)
    spec.report.parent.mkdir(parents=True)
    spec.report.write_text("# A toy reproduction\n\n<!-- safespot-reproduce pending toy -->\n")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_spec(spec, out, runner=FakeEpochs(stop_after=1))  # epoch 0 finished, killed in epoch 1
    second = FakeEpochs(stop_after=1)
    with pytest.raises(KeyboardInterrupt):
        run_spec(spec, out, runner=second)  # resumes after epoch 0; epoch 1 finished, killed in epoch 2
    assert f"ckpt_path={out}/train/model.interrupted/checkpoints/last.ckpt" in second.calls[0]
    other = shutil.copytree(out, tmp_path / "other")
    changed = parse_spec(
        "toy", {**raw, "runs": {"model": {**raw["runs"]["model"], "overrides": ["experiment=quickstart", "seed=1"]}}}
    )
    calls = FakeEpochs(stop_after=0)
    with pytest.raises(KeyboardInterrupt):
        run_spec(changed, other, runner=calls)
    assert not [c for c in calls.calls[0] if c.startswith("ckpt_path=")]  # trained with seed 0: not resumed
    # the sitting ends: its unfinished training is kept (resumable: the optimizer's state with it)
    with pytest.raises(SpecError, match="--partial keeps what it has"):
        keep(spec, out)
    records = keep(spec, out, partial=True)
    unfinished = records / "unfinished" / "train" / "model"
    last = torch.load(unfinished / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1 and "optimizer_states" in last
    best = torch.load(unfinished / "checkpoints" / "best-epoch001.ckpt", weights_only=True)
    assert "optimizer_states" not in best and torch.equal(best["state_dict"]["w"], torch.ones(4))  # never resumed
    assert pd.read_csv(unfinished / "metrics.csv")["epoch"].tolist() == [0, 1]  # the epochs cut short left out
    assert json.loads((unfinished / "progress.json").read_text())["epochs"] == 2
    assert pending(spec) and check_spec(spec) == []
    # the next sitting, in a new directory (a fresh machine), resumes from the kept training and is
    # stopped too: `keep --only grid --partial` keeps its unfinished training in place of the earlier
    later = FakeEpochs(stop_after=1)
    with pytest.raises(KeyboardInterrupt):
        run_spec(spec, tmp_path / "later", runner=later)
    assert f"ckpt_path={unfinished}/checkpoints/last.ckpt" in later.calls[0]
    keep_evaluations(spec, tmp_path / "later", ["grid"], partial=True)
    assert pd.read_csv(unfinished / "metrics.csv")["epoch"].tolist() == [0, 1, 2]
    assert torch.load(unfinished / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2
    assert not (spec.records / "eval" / "grid").exists()
    # a sitting behind the kept training (the first) or trained with other settings keeps nothing
    with pytest.raises(SpecError, match="nor a training to keep"):
        keep_evaluations(spec, out, ["grid"], partial=True)
    with pytest.raises(SpecError, match="has not finished evaluation 'grid'"):
        keep_evaluations(changed, other, ["grid"], partial=True)
    assert torch.load(unfinished / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2
    # the third sitting finishes the training and its evaluations
    third = FakeEpochs()
    run_spec(spec, tmp_path / "third", runner=third)
    trained = [c for c in third.calls if c[1] == "train.py"]
    assert len(trained) == 1 and f"ckpt_path={unfinished}/checkpoints/last.ckpt" in trained[0]
    keep(spec, tmp_path / "third", replace=True)
    final = spec.records / "train" / "model"
    metrics = pd.read_csv(final / "metrics.csv")
    assert metrics["epoch"].tolist() == [0, 1, 2, 3] and metrics["val/acc"].tolist() == [0.0, 0.1, 0.2, 0.3]
    best = torch.load(final / "checkpoints" / "best-epoch001.ckpt", weights_only=True)
    assert torch.equal(best["state_dict"]["w"], torch.full((4,), 1.0))
    assert not (spec.records / "unfinished").exists()
    (entry,) = [
        e for e in (json.loads(line) for line in (spec.records / "log.jsonl").open()) if e["key"] == "train/model"
    ]
    assert entry["resumed_after_epoch"] == 3
    assert not pending(spec) and check_spec(spec) == []


@pytest.mark.slow
def test_a_real_training_killed_and_resumed_by_the_engine_equals_an_uninterrupted_one(tmp_path):
    """train.py through the engine, with the default logger: killed after its first epoch, resumed by
    the next call; the resumed run ends with the uninterrupted run's weights, best checkpoint and
    ``metrics.csv`` rows (the test stage aside: it runs once, after the last epoch)."""
    train = ["data=synthetic", "data.n_train=1024", "data.batch_size=16", "model.backbone.width=8"]
    train += ["method=natural", "trainer=cpu", "trainer.max_epochs=3", "extras.print_config=false"]
    train += ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]

    def spec(name: str):
        raw = _spec(tmp_path / name)
        raw["runs"]["model"]["overrides"] = train
        return parse_spec("toy", raw)

    def killed_after_an_epoch(cmd: list[str], cwd: Path) -> None:
        run_dir = cwd / next(c for c in cmd if c.startswith("hydra.run.dir=")).split("=", 1)[1]  # as Hydra
        process = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (run_dir / "checkpoints" / "last.ckpt").exists():
            assert process.poll() is None, "the run ended before its first epoch did"
            time.sleep(0.05)
        process.kill()
        process.wait()
        raise KeyboardInterrupt

    whole = Reproduction(spec("whole"), tmp_path / "whole" / "out").checkpoint_of("model", "last")
    out = tmp_path / "parts" / "out"
    with pytest.raises(KeyboardInterrupt):
        Reproduction(spec("parts"), out, runner=killed_after_an_epoch).checkpoint_of("model", "last")
    resumed = Reproduction(spec("parts"), out).checkpoint_of("model", "last")
    a, b = (torch.load(p, weights_only=True, map_location="cpu") for p in (whole, resumed))
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (2, 180)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    bests = [sorted(p.name for p in c.parent.glob("best-*")) for c in (whole, resumed)]
    assert bests[0] == bests[1] and len(bests[0]) == 1
    one = pd.read_csv(whole.parent.parent / "csv" / "metrics.csv")
    joined = pd.read_csv(out / "train" / "model" / "metrics.csv")
    columns = sorted(c for c in one.columns if not c.startswith("test/"))
    rows = [
        frame.dropna(subset=[c for c in columns if c not in ("epoch", "step")], how="all") for frame in (one, joined)
    ]
    pd.testing.assert_frame_equal(*(r[columns].reset_index(drop=True) for r in rows))
    (entry,) = [json.loads(line) for line in (out / "log.jsonl").open()]
    assert entry["resumed_after_epoch"] == 1
