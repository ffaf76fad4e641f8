"""Reproductions of the papers' tables: specs (``conf/reproduce/NAME.yaml``) run by one engine."""

from safespot.reproduce.legacy import (  # noqa: F401
    ROOT,
    check_evaluations,
    checkpoint_in,
    commands_section,
    effective_overrides,
    evaluation_parts,
    new_output_dir,
    parse_pairs,
    read_records,
    reused_command,
    run_logged,
    stored_overrides,
    write_report,
)
