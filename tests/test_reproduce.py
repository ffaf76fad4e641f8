"""The reduced-reproduction script: argument checks and the report it renders."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

import safespot.reproduce.legacy as helpers
from conftest import fake_subprocess

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce_cifar10_reduced.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def _fake_eval(root: Path, preset: str, method: str, grey: float) -> Path:
    run = root / "eval" / preset
    run.mkdir(parents=True)
    results = {"meta": {"model": "SmallCNN", "method": method, "norm": "linf", "eps": 8 / 255}, "n_images": 10}
    for key, clean in (("preempt_none", 0.5), ("preempt_sfull", 0.5)):
        results |= {f"{key}/acc": clean, f"{key}_pgd/acc": grey if key == "preempt_sfull" else 0.2}
        results[f"{key}/safe_spot_rate"] = 1.0
    results |= {"preempt_sfull/recon_dist_mean": 0.06, "preempt_sfull_white_pgd/invalid_rate": 0.8}
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_report_names_models_and_holds_the_published_numbers(tmp_path):
    runs = [
        _fake_eval(tmp_path, "reduced_cifar10_adv_linf", "AdversarialTraining", 0.45),
        _fake_eval(tmp_path, "reduced_cifar10_preemptive_linf", "PreemptiveTraining", 0.48),
    ]
    args = argparse.Namespace(test_images=10, seed=3, no_autoattack=True)
    text = reproduce.render(runs, ["python train.py experiment=x seed=3"], args)
    assert "| ADV | linf | 8/255 | None | 50.0 | 20.0 |" in text
    assert "| Ours (preemptive) | linf | 8/255 | S-Full | 50.0 | 48.0 |" in text
    assert "| ADV | None | 86.72 | 54.59 | 51.68 |" in text  # paper 002, Table 1
    assert "86.51 / 85.06" in text and "seed 3" in text and "python train.py experiment=x seed=3" in text
    assert "| ADV | 0.0600 | 80.0 |" in text


def test_bad_arguments_fail_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("LOG_DIR", str(tmp_path))
    with pytest.raises(SystemExit):
        reproduce.main(["--reuse", "reduced_cifar10_unknown=/x"])
    with pytest.raises(SystemExit, match="no best checkpoint"):
        reproduce.main(["--reuse", f"reduced_cifar10_adv_linf={tmp_path}"])
    with pytest.raises(SystemExit):
        reproduce.main(["--test-images", "0"])
    assert not (tmp_path / "reproduce_cifar10_reduced").exists()


def test_reused_evaluations_make_a_report_without_running_anything(tmp_path, monkeypatch):
    sources = tmp_path / "earlier"
    methods = {"reduced_cifar10_natural": "NaturalTraining", "reduced_cifar10_adv_linf": "AdversarialTraining"}
    methods["reduced_cifar10_preemptive_linf"] = "PreemptiveTraining"
    reused = [f"{p}={_fake_eval(sources, p, m, 0.4)}" for p, m in methods.items()]

    def no_subprocess(*args, **kwargs):
        raise AssertionError("nothing should be trained or evaluated")

    monkeypatch.setattr(helpers.subprocess, "run", no_subprocess)
    out = tmp_path / "new"
    assert reproduce.main(["--out", str(out), *[arg for r in reused for arg in ("--reuse-eval", r)]]) == 0
    report = (out / "report.md").read_text()
    assert "| Natural |" in report and "| Ours (preemptive) |" in report and "| ADV |" in report
    assert "reused grid evaluation" in report
    assert (sources / "eval" / "reduced_cifar10_adv_linf" / "results.json").is_file()  # the source is untouched
    with pytest.raises(SystemExit):
        reproduce.main(["--reuse-eval", f"reduced_cifar10_adv_linf={tmp_path / 'missing'}"])


def test_models_are_trained_as_presets_at_the_reduced_scale(tmp_path, monkeypatch):
    """Each run reduced_<preset> trains ``experiment=<preset> scale=reduced`` (no reduced_* preset)."""
    labels = {"natural": "NaturalTraining", "adv_linf": "AdversarialTraining", "preemptive_linf": "PreemptiveTraining"}

    def evaluate(cmd, out):
        _fake_eval(out.parent.parent, out.name, labels[out.name.removeprefix("reduced_cifar10_")], 0.4)

    commands = fake_subprocess(monkeypatch, evaluate)
    assert reproduce.main(["--out", str(tmp_path / "new"), "--no-autoattack"]) == 0
    trained = [cmd[2:4] for cmd in commands if cmd[1] == "train.py"]
    assert trained == [[f"experiment=cifar10_{p}", "scale=reduced"] for p in ("natural", "preemptive_linf", "adv_linf")]
    report = (tmp_path / "new" / "report.md").read_text()
    assert "python train.py experiment=cifar10_adv_linf scale=reduced seed=0" in report


def _fake_records(run: Path, none_rate: float, full_rate: float, n: int = 200) -> None:
    """Per-image records: grey-box PGD correct on the first none_rate / full_rate of the images."""
    position = [i / n for i in range(n)]
    table = {"index": list(range(n)), "clean/correct": [True] * n}
    for key, rate in (("preempt_none", none_rate), ("preempt_sfull", full_rate)):
        table[f"{key}/correct"] = [True] * n
        table[f"{key}_pgd/correct"] = [p < rate for p in position]
    import pandas as pd

    pd.DataFrame(table).to_csv(run / "records.csv", index=False)


def test_report_gives_intervals_and_paired_verdicts_from_the_records(tmp_path):
    adv = _fake_eval(tmp_path, "reduced_cifar10_adv_linf", "AdversarialTraining", 0.45)
    ours = _fake_eval(tmp_path, "reduced_cifar10_preemptive_linf", "PreemptiveTraining", 0.48)
    _fake_records(adv, 0.25, 0.45)
    _fake_records(ours, 0.30, 0.30)
    args = argparse.Namespace(test_images=200, seed=0, no_autoattack=True)
    text = reproduce.render([adv, ours], [], args)
    lines = text.splitlines()
    assert "| ADV | None | 100.0 [98.1, 100.0] | 25.0 [19.5, 31.4] | – | – |" in text
    row = next(line for line in lines if line.startswith("| ADV | grey-box PGD accuracy, S-Full minus None"))
    assert "+20.0 pp" in row and row.endswith("| holds |")
    start = "| Ours (preemptive) | grey-box PGD accuracy, S-Full minus None"
    row = next(line for line in lines if line.startswith(start))
    assert row.endswith("| inconclusive at this scale |")  # no change: the interval still holds gains of 1 pp
    row = next(line for line in lines if line.startswith("| both |"))
    assert "-15.0 pp" in row and row.endswith("| does not hold |")


def test_the_l2_table_trains_the_l2_presets_and_evaluates_under_the_l2_threat(tmp_path, monkeypatch):
    """``--norm l2 --models natural,adv,spgd_adv``: paper 002 Table 2 / paper 000 Table 1 right."""
    methods = {"natural": "NaturalTraining", "adv_l2": "AdversarialTraining", "spgd_adv_l2": "SafeSpotAdversarial"}

    def evaluate(cmd, out):
        _fake_eval(out.parent.parent, out.name, methods[out.name.removeprefix("reduced_cifar10_")], 0.4)

    commands = fake_subprocess(monkeypatch, evaluate)
    out = tmp_path / "new"
    assert reproduce.main(["--out", str(out), "--norm", "l2", "--models", "natural,adv,spgd_adv"]) == 0
    trained = [cmd[2] for cmd in commands if cmd[1] == "train.py"]
    assert trained == ["experiment=cifar10_natural", "experiment=cifar10_adv_l2", "experiment=cifar10_spgd_adv_l2"]
    evaluations = [cmd for cmd in commands if cmd[1] == "evaluate.py"]
    assert len(evaluations) == 3 and all("threat=l2_0.5" in c for c in evaluations)
    no_white_aa = "~evaluation.preempt_sfull.white_box.attacks.autoattack"
    assert all(no_white_aa in c for c in evaluations)  # off by default, and the report says so
    assert "no white-box AutoAttack (paper 002's lowest l_2 column" in (out / "report.md").read_text()
    commands.clear()
    args = ["--out", str(tmp_path / "aa"), "--norm", "l2", "--models", "adv", "--white-autoattack"]
    assert reproduce.main(args) == 0
    assert not any(no_white_aa in c for c in commands)
    report = (out / "report.md").read_text()
    assert report.startswith("# CIFAR-10 reduced reproduction (l_2, eps = delta = 0.5)")
    assert "| ADV | Ours | 90.85 | 84.81 | 83.56 | 85.12 | 79.48 |" in report  # paper 002, Table 2
    assert "94.10 / 93.54" in report and "| S-PGD+ADV |" in report  # paper 000, Table 1 right
    with pytest.raises(SystemExit):
        reproduce.main(["--out", str(tmp_path / "o"), "--models", "natural,sideways"])
    with pytest.raises(SystemExit):
        reproduce.main(["--out", str(tmp_path / "o"), "--norm", "l7"])
    assert not (tmp_path / "o").exists()


def test_safe_spot_aware_rows_are_compared_with_adv_on_the_same_images(tmp_path):
    adv = _fake_eval(tmp_path, "reduced_cifar10_adv_linf", "AdversarialTraining", 0.45)
    spgd = _fake_eval(tmp_path, "reduced_cifar10_spgd_adv_linf", "SafeSpotAdversarial", 0.60)
    _fake_records(adv, 0.25, 0.45)
    _fake_records(spgd, 0.20, 0.70)
    text = reproduce.render([adv, spgd], [], argparse.Namespace(test_images=200, seed=0, no_autoattack=True))
    row = next(line for line in text.splitlines() if line.startswith("| S-PGD+ADV vs ADV | grey-box PGD"))
    assert "+25.0 pp" in row and row.endswith("| holds |")
    assert "| S-PGD+ADV vs ADV | clean accuracy, S-PGD+ADV minus ADV (paper 000, Table 1: 91.32 vs 86.51)" in text
    assert "(paper 000, Table 1: 89.84 vs 85.06)" in row  # the published gap next to the measured one


def test_rows_sharing_model_and_method_keep_their_own_labels(tmp_path):
    """S-FGSM+ADV and S-PGD+ADV are both PreemptiveTraining of the same network: each grid row is
    named by its run (both used to be labelled S-PGD+ADV)."""
    runs = [
        _fake_eval(tmp_path, "reduced_cifar10_sfgsm_adv_linf", "PreemptiveTraining", 0.30),
        _fake_eval(tmp_path, "reduced_cifar10_spgd_adv_linf", "PreemptiveTraining", 0.40),
    ]
    text = reproduce.render(runs, [], argparse.Namespace(test_images=10, seed=0, no_autoattack=True))
    assert "| S-FGSM+ADV | linf | 8/255 | S-Full | 50.0 | 30.0 |" in text
    assert "| S-PGD+ADV | linf | 8/255 | S-Full | 50.0 | 40.0 |" in text
    assert "| S-FGSM+ADV | 8/255 | 50.0 / 20.0 |" in text and "| S-PGD+ADV | 8/255 | 50.0 / 20.0 |" in text


def test_default_output_directories_started_in_the_same_second_differ(tmp_path, monkeypatch):
    class FrozenClock:
        @staticmethod
        def now():
            import datetime

            return datetime.datetime(2026, 1, 1)

    monkeypatch.setenv("LOG_DIR", str(tmp_path))
    monkeypatch.setattr(helpers, "datetime", FrozenClock)
    first, second = helpers.new_output_dir("x", None), helpers.new_output_dir("x", None)
    assert first != second and first.is_dir() and second.is_dir()
    with pytest.raises(FileExistsError):  # an explicit --out that exists is still refused
        helpers.new_output_dir("x", first)


def test_records_of_an_evaluation_in_pieces_are_joined_and_overlaps_refused(tmp_path):
    import pandas as pd

    for name, index in (("a", [4, 0]), ("b", [2]), ("c", [2, 9])):
        (tmp_path / name).mkdir()
        frame = pd.DataFrame({"index": index, "clean/correct": [True] * len(index)})
        frame.to_csv(tmp_path / name / "records.csv", index=False)
    joined = helpers.read_records(f"{tmp_path / 'a'},{tmp_path / 'b'}")
    assert joined.index.tolist() == [0, 2, 4]
    assert helpers.read_records(tmp_path / "a").index.tolist() == [0, 4]
    with pytest.raises(ValueError, match="share images"):
        helpers.read_records(f"{tmp_path / 'b'},{tmp_path / 'c'}")
    parser = argparse.ArgumentParser()
    with pytest.raises(SystemExit):  # a missing piece is a usage error before any work
        pieces = {"5": f"{tmp_path / 'a'},{tmp_path / 'missing'}"}
        helpers.check_evaluations(parser, pieces, "--reuse-eval", "records.csv")


def test_logged_commands_name_paths_inside_the_checkout_relative_to_it(tmp_path, monkeypatch):
    """A report's commands are copied into docs: a run directory under the checkout appears as
    ``logs/...``, not as this machine's absolute path; paths elsewhere stay as they are."""
    ran = []
    monkeypatch.setattr(helpers.subprocess, "run", lambda cmd, **kw: ran.append((cmd, kw["cwd"])))
    log: list[str] = []
    checkout = tmp_path / "checkout"
    cmd = ["/venv/bin/python", "train.py", f"hydra.run.dir={checkout}/logs/run", f"init_from={tmp_path}/elsewhere.ckpt"]
    helpers.run_logged(cmd, log, cwd=checkout)
    assert ran == [(cmd, checkout)]  # the command itself runs unchanged
    line = log[0].split("    # ")[0]
    assert line == f"python train.py hydra.run.dir=logs/run init_from={tmp_path}/elsewhere.ckpt"


def test_effective_overrides_keep_the_last_value_of_a_repeated_key(tmp_path):
    """A run made with ``trainer.max_epochs=16 ... trainer.max_epochs=24`` trained 24 epochs (Hydra's
    last value wins); the stored command line keeps both, the effective overrides one."""
    from safespot.reproduce import effective_overrides, stored_overrides

    assert effective_overrides(tmp_path) is None
    (tmp_path / ".hydra").mkdir()
    lines = ["experiment=x", "trainer.max_epochs=16", "method/kl_weights=authors", "trainer.max_epochs=24"]
    (tmp_path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in lines))
    assert stored_overrides(tmp_path) == lines
    assert effective_overrides(tmp_path) == ["experiment=x", "method/kl_weights=authors", "trainer.max_epochs=24"]
