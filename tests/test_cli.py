"""The console scripts and the top-level scripts are the same commands (safespot.cli)."""

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from safespot import cli

COMMANDS = {"train": "train_main", "evaluate": "evaluate_main", "robustify": "robustify_main", "ood": "ood_main"}


def test_console_scripts_point_at_the_cli():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name.startswith("safespot-")}
    expected = {f"safespot-{name}": f"safespot.cli:{fn}" for name, fn in COMMANDS.items()}
    others = {"safespot-demo": "safespot.cli:demo_main", "safespot-reproduce": "safespot.reproduce.cli:main"}
    assert scripts == {**expected, **others}
    assert all(callable(getattr(cli, fn)) for fn in COMMANDS.values())


@pytest.mark.parametrize(
    "name", [n if n == "train" else pytest.param(n, marks=pytest.mark.slow) for n in sorted(COMMANDS)]
)
def test_console_script_reports_a_setting_error_with_status_2(name, tmp_path):
    script = Path(sys.executable).parent / f"safespot-{name}"
    if not script.exists():
        pytest.fail(f"{script} is missing: reinstall the package (pip install -e .)")
    args = [f"ckpt_path={tmp_path / 'missing.ckpt'}", f"hydra.run.dir={tmp_path / 'run'}"]
    if name == "robustify":
        args += [f"input={tmp_path}", f"output={tmp_path / 'out'}"]
    if name == "train":
        args = ["data=synthetic", "threat.eps=-1", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")


def _run(name: str, *args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / f"safespot-{name}"
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "name", [n if n in ("evaluate", "train") else pytest.param(n, marks=pytest.mark.slow) for n in sorted(COMMANDS)]
)
def test_a_run_directory_holding_an_earlier_run_is_refused_and_left_as_it_was(name, tmp_path):
    """An explicit ``hydra.run.dir`` naming an earlier run's directory (e.g. a report's command
    pasted again) is refused with one line and status 2 before Hydra rewrites anything."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("earlier: run\n")
    (run / "records.csv").write_text("index,clean/correct\n0,1\n")
    before = _snapshot(run)
    done = _run(name, f"ckpt_path={tmp_path / 'missing.ckpt'}", f"hydra.run.dir={run}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: hydra.run.dir={run} already holds an earlier run")
    assert _snapshot(run) == before


@pytest.mark.slow
def test_the_same_command_twice_into_one_directory_stops_at_the_second(tmp_path):
    """The first run fails on its setting after Hydra made its directory; the second call into the
    same directory is refused for the directory, and the first run's files stay as they were."""
    args = ["data=synthetic", "threat.eps=-1", f"hydra.run.dir={tmp_path / 'run'}"]
    first = _run("train", *args)
    assert first.returncode == 2 and "eps" in first.stderr.strip().splitlines()[-1]
    before = _snapshot(tmp_path / "run")
    assert ".hydra/config.yaml" in before
    second = _run("train", *args)
    assert second.returncode == 2 and "already holds an earlier run" in second.stderr
    assert _snapshot(tmp_path / "run") == before


def test_a_sweep_directory_holding_an_earlier_sweep_is_refused(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("earlier: sweep\n")
    done = _run("train", "-m", "data=synthetic", "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert done.returncode == 2 and "hydra.sweep.dir" in done.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in sweep.iterdir()) == ["multirun.yaml"]


def test_a_directory_holding_outputs_but_no_hydra_configs_is_refused_and_left_as_it_was(tmp_path):
    """A copied results folder (records and results, no ``.hydra/``) named as the run directory:
    the evaluation would rewrite both files; it is refused before Hydra writes anything."""
    run = tmp_path / "copied_results"
    run.mkdir()
    (run / "records.csv").write_text("index,clean/correct\n0,1\n")
    (run / "results.json").write_text('{"clean/acc": 1.0}\n')
    before = _snapshot(run)
    done = _run("evaluate", f"ckpt_path={tmp_path / 'missing.ckpt'}", f"hydra.run.dir={run}")
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: hydra.run.dir={run} already holds files (records.csv, results.json)")
    assert _snapshot(run) == before


def test_only_a_directory_holding_nothing_but_logs_is_taken_as_unused(tmp_path):
    from safespot.utils.run_dirs import RunDirectoryInUse, check_unused

    check_unused(tmp_path / "new", "hydra.run.dir", ".hydra")  # not there yet
    (tmp_path / "logs_only").mkdir()
    (tmp_path / "logs_only" / "train.log").write_text("a rank's log\n")  # another rank of the same run
    check_unused(tmp_path / "logs_only", "hydra.run.dir", ".hydra")
    for name in ("splits.json", "checkpoints", "old.log.d"):
        held = tmp_path / f"holds_{name}"
        held.mkdir()
        (held / name).mkdir() if name != "splits.json" else (held / name).write_text("{}")
        with pytest.raises(RunDirectoryInUse, match=f"already holds files \\({name}\\)"):
            check_unused(held, "hydra.run.dir", ".hydra")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(RunDirectoryInUse, match="is a file"):
        check_unused(tmp_path / "a_file", "hydra.run.dir", ".hydra")
