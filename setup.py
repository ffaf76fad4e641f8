"""Packaging beyond pyproject.toml: an installed wheel carries the checkout's Hydra configs.

The configs live in the checkout's top-level ``conf/`` (the one source); ``build_py`` copies them
into the built package as ``safespot/conf``, where :data:`safespot.paths.CONFIG_DIR` finds them when
the package runs outside a checkout (``pip install .``, a wheel)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "safespot" / "conf"
        if target.exists():
            shutil.rmtree(target)
        # conf/local/*.yaml but the committed examples are a machine's own settings: never shipped
        shutil.copytree(HERE / "conf", target)
        for own in ("local/default.yaml", "local/evaluate.yaml", "local/robustify.yaml", "local/ood.yaml"):
            (target / own).unlink(missing_ok=True)


setup(cmdclass={"build_py": BuildWithConfigs})
