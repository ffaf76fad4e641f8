"""Installed anywhere: a built wheel (``pip install .``, not editable) carries its configs and runs
its commands outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_runs_the_commands_with_its_own_configs(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "-q", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(wheels)],
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    (wheel,) = wheels.glob("safespot-*.whl")
    subprocess.run([*pip, "install", "-q", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=600)
    assert (site / "safespot" / "conf" / "train.yaml").is_file() and (site / "safespot" / "LICENSE").exists() is False
    env = {**os.environ, "PYTHONPATH": str(site), "LOG_DIR": str(tmp_path / "logs")}  # the wheel before the checkout
    where = subprocess.run([sys.executable, "-c", "import safespot.paths as p; print(p.CONFIG_DIR)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True)  # fmt: skip
    assert Path(where.stdout.strip()) == site / "safespot" / "conf"
    train = "from safespot.cli import train_main; train_main()"
    args = [
        "data=synthetic",
        "debug=fast_dev_run",
        "model.backbone.width=8",
        "method=natural",
        "extras.print_config=false",
    ]
    done = subprocess.run([sys.executable, "-c", train, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[safespot] test/acc" in done.stdout and (tmp_path / "logs" / "debug" / "runs").is_dir()


def test_the_license_file_is_the_one_pyproject_declares():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "Permission is hereby granted, free of charge" in text


def test_the_readmes_cpu_only_install_is_what_make_install_runs():
    """README's CPU-only install line is a make variable that installs torch and torchvision from
    that index before the package (so pip does not fetch the CUDA build as a dependency)."""
    index = "https://download.pytorch.org/whl/cpu"
    assert f"make install TORCH_INDEX={index}" in (ROOT / "README.md").read_text()
    dry = subprocess.run(
        ["make", "-n", "install", f"TORCH_INDEX={index}", "VENV=/nonexistent/venv"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = dry.stdout.splitlines()
    torch_line = next(i for i, line in enumerate(lines) if f"--index-url {index}" in line)
    package_line = next(i for i, line in enumerate(lines) if 'install -e ".[dev]"' in line)
    assert "install torch torchvision" in lines[torch_line] and torch_line < package_line
    plain = subprocess.run(
        ["make", "-n", "install", "VENV=/nonexistent/venv"], cwd=ROOT, capture_output=True, text=True
    )
    assert "--index-url" not in plain.stdout  # without the variable: the default index only
