"""OOD detection with a checkpoint: ``python ood.py ckpt_path=PATH [detector=[msp,energy,...]]`` (see docs/ood.md)."""

import hydra
from omegaconf import DictConfig

import safespot  # noqa: F401  (registers config resolvers)
from safespot.ood.evaluate import evaluate_ood
from safespot.utils.task import report_config_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="ood")
@report_config_errors
def main(cfg: DictConfig) -> None:
    evaluate_ood(cfg)


if __name__ == "__main__":
    main()
