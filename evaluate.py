"""Evaluate a checkpoint: ``python evaluate.py ckpt_path=PATH [threat.eps=...]`` (see README)."""

import hydra
from omegaconf import DictConfig

import safespot  # noqa: F401  (registers config resolvers)
from safespot.evaluate import evaluate
from safespot.utils.task import report_config_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@report_config_errors
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
