"""OOD detection with a checkpoint: ``python ood.py ckpt_path=PATH [detector=[msp,energy,...]]`` (see docs/ood.md).

The same command is installed as ``safespot-ood`` (:mod:`safespot.cli`)."""

from safespot.cli import ood_main

if __name__ == "__main__":
    ood_main()
