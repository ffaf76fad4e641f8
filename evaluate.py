"""Evaluate a checkpoint: ``python evaluate.py ckpt_path=PATH [threat.eps=...]`` (see README).

The same command is installed as ``safespot-evaluate`` (:mod:`safespot.cli`)."""

from safespot.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
