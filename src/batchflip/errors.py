"""Exceptions with messages that name the file, row and field at fault."""

from __future__ import annotations


class BatchflipError(Exception):
    """A user-facing error: the CLI prints it in one line and exits with status 1."""


class InputError(BatchflipError):
    """Bad input data, located by file, row (or sample id) and field."""

    def __init__(self, path: object, problem: str, row: object = None, field: str | None = None):
        where = [str(path)]
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {problem}")
        self.path, self.row, self.field, self.problem = path, row, field, problem
