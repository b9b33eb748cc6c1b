"""structlog set up once: JSON lines on stdout for journald, readable output on a terminal.

Standard-library loggers (pynetdicom's among them) go through the same formatter. Event names are facts in
snake_case; only UIDs, AE titles and addresses are bound, never patient names, IDs or birth dates.
"""

from __future__ import annotations

import logging
import sys

import structlog
from pydicom import config as pydicom_config

from qc_daemon.settings import LogFormat, LoggingSettings


def configure_logging(settings: LoggingSettings, stream=None) -> None:
    stream = stream or sys.stdout
    use_json = settings.format is LogFormat.JSON or (
        settings.format is LogFormat.AUTO and not (hasattr(stream, "isatty") and stream.isatty())
    )
    shared: list = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=hasattr(stream, "isatty") and stream.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    # pynetdicom logs every PDU at INFO, and its debug output dumps datasets (patient data): keep it quiet.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("dicom2nifti").setLevel(logging.WARNING)
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    # highdicom warns with the offending value when it copies a patient module (a name, a birth date): errors
    # reach us as exceptions, recorded without patient data (qc_daemon.pacs_report.scrub_patient_data).
    logging.getLogger("highdicom").setLevel(logging.CRITICAL)
    # pydicom quotes a value it doubts (a birth date, a name) in a warning and on its logger: in the daemon a
    # received value is never checked by pydicom while reading (the intake checks structure, not values).
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
