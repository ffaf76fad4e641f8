"""Paper 004 Table 1 (worst-case accuracy, FC, FW and MPR with rejection) from evaluation runs of
``evaluate.py evaluation=[rejection_flss]`` / ``[rejection_conf]``; see docs/flss.md.

Usage::

    python scripts/rejection_table.py --row "PGD-AT=RUN_A" --row "TRADES=RUN_B" \\
        --row "FLSS (SD=1)=RUN_C:ns" --row "FLSS (SD=2)=RUN_D:vote" [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from safespot.evaluation.rejection_metrics import main

if __name__ == "__main__":
    sys.exit(main())
