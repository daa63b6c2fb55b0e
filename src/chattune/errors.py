"""Typed, user-facing errors. Library code raises them; only the CLI maps them to exit codes."""

from __future__ import annotations


class ChattuneError(Exception):
    """An error the user can fix; the CLI prints it as one paragraph and exits non-zero."""

    exit_code = 1


class ConfigError(ChattuneError):
    """A config file or `key=value` override that is wrong."""

    exit_code = 2


class DataFormatError(ChattuneError):
    """A data record that cannot be read; names the file, line (or array item) and field."""

    exit_code = 3

    def __init__(
        self,
        reason: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        item: int | None = None,
    ):
        self.reason, self.file, self.line, self.field, self.item = reason, file, line, field, item
        super().__init__(self.describe())

    def describe(self) -> str:
        """The error as one sentence: `file:line (item k): field 'x': reason`."""
        where = []
        if self.file is not None:
            where.append(str(self.file) + (f":{self.line}" if self.line is not None else ""))
            if self.item is not None:
                where[-1] += f" (item {self.item})"
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return (": ".join(where) + ": " if where else "") + self.reason


class OutOfMemory(ChattuneError):
    """A training step that did not fit in memory; names the step, the batch and the settings that help."""

    exit_code = 5


class ModelLoadError(ChattuneError):
    """A model or tokenizer that cannot be found or loaded (offline hub ids included)."""

    exit_code = 4
