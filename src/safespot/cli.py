"""Command-line entry points: ``safespot-train``, ``safespot-evaluate``, ``safespot-robustify``,
``safespot-ood`` and ``safespot-demo`` (console scripts of the package), which the top-level ``train.py``,
``evaluate.py``, ``robustify.py`` and ``ood.py`` call too. Each composes its Hydra config from
:data:`safespot.paths.CONFIG_DIR` (the checkout's ``conf/``; ``SAFESPOT_CONFIG_DIR`` points
elsewhere), prints setting errors as one line with exit status 2, and returns the task's value
(the monitored metric of a training run, for sweepers)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import safespot  # noqa: F401  (registers config resolvers)
from safespot.demo import main as demo
from safespot.evaluate import evaluate
from safespot.ood.evaluate import evaluate_ood
from safespot.paths import CONFIG_DIR
from safespot.robustify_files import any_failed, robustify_files
from safespot.train import run
from safespot.utils.task import report_config_errors

_CONF = str(CONFIG_DIR)


@hydra.main(version_base="1.3", config_path=_CONF, config_name="train")
@report_config_errors
def train_main(cfg: DictConfig) -> float | None:
    """Train a classifier (``safespot-train experiment=quickstart``)."""
    return run(cfg)


@hydra.main(version_base="1.3", config_path=_CONF, config_name="evaluate")
@report_config_errors
def evaluate_main(cfg: DictConfig) -> None:
    """Evaluate a checkpoint (``safespot-evaluate ckpt_path=PATH evaluation=[clean,pgd]``)."""
    evaluate(cfg)


@hydra.main(version_base="1.3", config_path=_CONF, config_name="robustify")
@report_config_errors
def robustify_main(cfg: DictConfig) -> None:
    """Robustify image files; exit status 1 when a file failed."""
    if any_failed(robustify_files(cfg)):
        raise SystemExit(1)


@hydra.main(version_base="1.3", config_path=_CONF, config_name="ood")
@report_config_errors
def ood_main(cfg: DictConfig) -> None:
    """OOD detection with a checkpoint (``safespot-ood ckpt_path=PATH``)."""
    evaluate_ood(cfg)


def demo_main() -> None:
    """Train, evaluate and robustify in one go and print the headline (``safespot-demo``; see
    :mod:`safespot.demo`, whose options and overrides it takes)."""
    raise SystemExit(report_config_errors(demo)())
