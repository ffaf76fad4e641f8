"""Train a classifier: ``python train.py experiment=quickstart`` (see README).

The same command is installed as ``safespot-train`` (:mod:`safespot.cli`)."""

from safespot.cli import train_main

if __name__ == "__main__":
    train_main()
