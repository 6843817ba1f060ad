"""The export error taxonomy.

Every failure the user can cause or fix (a wrong path, an unsupported model, a corrupt
checkpoint, a graph that fails validation) is an :class:`ExportError` with a message that names
the file or the check. The CLI maps each class to a distinct exit code once, so scripts can tell
"your input is wrong" from "the export produced a bad model".
"""

from __future__ import annotations


class ExportError(Exception):
    """Base class: a clear, user-facing reason why no bundle was produced."""

    exit_code = 1


class SourceError(ExportError):
    """The model source cannot be read: missing folder, unreachable hub, unknown builtin."""

    exit_code = 2


class UnsupportedArchitecture(ExportError):
    """The checkpoint's architecture (or pooling) is not one of the supported families."""

    exit_code = 3


class CheckpointError(ExportError):
    """The checkpoint is present but broken: truncated weights, missing tensors, bad config."""

    exit_code = 4


class TokenizerMismatch(ExportError):
    """The tokenizer cannot drive this model (ids beyond the embedding table, missing EOS, ...)."""

    exit_code = 5


class OutputError(ExportError):
    """The output location cannot be written, or already holds something we must not replace."""

    exit_code = 6


class QuantizationError(ExportError):
    """A precision transform did not produce the ops it should have (e.g. silently unquantised)."""

    exit_code = 7


class ValidationFailed(ExportError):
    """The exported graph disagrees with the reference beyond the precision's tolerance."""

    exit_code = 8
