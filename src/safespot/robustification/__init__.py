"""Robustifying image files on Lightning's Trainer (``robustify.py``): the predict module, the
writer callback that puts PNGs, journals and the report into the output directory, the rows they
write, and the contact sheet drawn from the report. The files are read by
:class:`safespot.data.image_files.ImageFilesDataModule`."""

from safespot.robustification.contact_sheet import write_contact_sheet
from safespot.robustification.module import FileResult, RobustificationModule
from safespot.robustification.outputs import check_output
from safespot.robustification.records import FIELDS, any_failed, summarize, summary_line
from safespot.robustification.writer import REPORT_INDEX, RobustificationWriter, report_json

__all__ = [
    "FIELDS",
    "REPORT_INDEX",
    "FileResult",
    "RobustificationModule",
    "RobustificationWriter",
    "any_failed",
    "check_output",
    "report_json",
    "summarize",
    "summary_line",
    "write_contact_sheet",
]
