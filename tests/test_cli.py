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
    assert scripts == {**expected, "safespot-demo": "safespot.cli:demo_main"}
    assert all(callable(getattr(cli, fn)) for fn in COMMANDS.values())


@pytest.mark.parametrize("name", sorted(COMMANDS))
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
