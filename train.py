"""Train a classifier: ``python train.py experiment=quickstart`` (see README)."""

import hydra
from omegaconf import DictConfig

import safespot  # noqa: F401  (registers config resolvers)
from safespot.train import run
from safespot.utils.task import report_config_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@report_config_errors
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
