"""A log file that rotates at a size, for the adapter (adapter/run.py) and KServe's predictor
(handler/kserve_predictor.py): at ``maxBytes`` it becomes NAME.1 (NAME.1 NAME.2, ...), ``backupCount`` of them
kept. Their defaults (10 MiB, 5) are serving/settings.py's LOG_MAX_BYTES / LOG_BACKUPS. What a process prints
outside logging (a crash at start-up, a C library's warnings) goes to ``stderr_file(log)`` beside it, begun afresh
at each start.

Standard library only: the handler imports it.
"""
from __future__ import annotations

import logging
from logging.handlers import RotatingFileHandler
from pathlib import Path


def stderr_file(log_file: Path) -> Path:
    """Where the process's own output goes (start-up crashes); logging writes `log_file`."""
    return Path(log_file).with_suffix(".stderr.log")


class RotatingLog(RotatingFileHandler):
    """logging's RotatingFileHandler, counting the file's size itself: the stock one asks the file
    system (two stats and a seek) and formats each record twice, per line. With one access line per
    request, that is a third of a line's CPU (benchmarks/RESULTS.md, "The edge")."""

    def shouldRollover(self, record) -> bool:  # noqa: N802 - logging's name
        return False  # emit() decides, from the size it counts

    def emit(self, record) -> None:
        try:
            line = self.format(record) + self.terminator
            if self.stream is None:
                self.stream = self._open()
            size = getattr(self, "_size", None)
            if size is None:
                size = self.stream.seek(0, 2)
            if self.maxBytes > 0 and size + len(line) >= self.maxBytes and size > 0:
                self.doRollover()
                size = 0
            self.stream.write(line)
            self.stream.flush()
            self._size = size + (len(line) if line.isascii() else len(line.encode(self.encoding or "utf-8")))
        except Exception:  # noqa: BLE001 - logging's own policy: report, never raise
            self.handleError(record)


class EachLoggersFormat(logging.Formatter):
    """One handler's formatter for loggers that each had their own: a record is formatted by the formatter of
    the nearest logger up its name (``uvicorn.error`` -> ``uvicorn``'s), else by ``default``."""

    def __init__(self, formatters: dict[str, logging.Formatter], default: logging.Formatter):
        super().__init__()
        self.formatters, self.default = dict(formatters), default
        self._found: dict[str, logging.Formatter] = {}

    def _for(self, name: str) -> logging.Formatter:
        found = self._found.get(name)
        if found is None:
            part = name
            while part not in self.formatters and "." in part:
                part = part.rsplit(".", 1)[0]
            found = self._found[name] = self.formatters.get(part, self.default)
        return found

    def format(self, record: logging.LogRecord) -> str:
        return self._for(record.name).format(record)


def log_everything_to(handler: logging.Handler, default_logger: str) -> None:
    """Every logger that has handlers now (a library's logging configuration: KServe's, uvicorn's), and the root
    logger (a library's warnings that nobody configured: Python's last resort printed them to stderr), writes to
    `handler` instead, each line in the format its logger's own handler gave it (the first one's); a logger
    without one, in `default_logger`'s."""
    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    formatters = {}
    for logger in loggers:
        if logger.handlers:
            if logger.handlers[0].formatter is not None:
                formatters[logger.name] = logger.handlers[0].formatter
            logger.handlers[:] = [handler]
    default = formatters.get(default_logger, logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setFormatter(EachLoggersFormat(formatters, default))
    logging.getLogger().handlers[:] = [handler]
