"""Robustify image files: ``python robustify.py ckpt_path=PATH input=DIR output=DIR`` (see README).

Exit status 0 when every image was written, 1 when a file failed, 2 for a setting error."""

import hydra
from omegaconf import DictConfig

import safespot  # noqa: F401  (registers config resolvers)
from safespot.robustify import any_failed, robustify_files
from safespot.utils.task import report_config_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="robustify")
@report_config_errors
def main(cfg: DictConfig) -> None:
    if any_failed(robustify_files(cfg)):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
