"""Robustify image files: ``python robustify.py ckpt_path=PATH input=DIR output=DIR`` (see README).

Exit status 0 when every image was written, 1 when a file failed, 2 for a setting error.

The same command is installed as ``safespot-robustify`` (:mod:`safespot.cli`)."""

from safespot.cli import robustify_main

if __name__ == "__main__":
    robustify_main()
