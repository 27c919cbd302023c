"""Exceptions raised by noisequery_core: one family, each message says what, where and how to fix."""

from __future__ import annotations


class NoiseQueryError(Exception):
    """Base class for every error this package raises on purpose."""


class LibraryError(NoiseQueryError):
    """A library on disk is missing, unreadable, locked or inconsistent."""


class SchemaVersionError(LibraryError):
    """The manifest was written by a newer (or unknown) schema version."""


class IncompatibleLibraryError(LibraryError):
    """Two libraries (or a library and a request) disagree on generation key or feature set."""


class LibraryLockedError(LibraryError):
    """Another process holds the library's writer lock."""


class QueryError(NoiseQueryError):
    """A query is malformed or cannot be answered by this library."""


class ModelError(NoiseQueryError):
    """A CLIP model cannot be named, found or loaded."""


class MissingDependencyError(NoiseQueryError):
    """An optional Python package is needed but not installed."""


class Cancelled(NoiseQueryError):
    """Raised by a host's ``check_cancel`` (see noisequery_core.work) to stop long work.

    Work committed before the cancel point is kept; the operation can be resumed.
    """


class HighlightError(NoiseQueryError):
    """Highlight (scribble) guidance input is malformed: strokes JSON, masks, phrases or the model."""


class NoiseCLRError(NoiseQueryError):
    """NoiseCLR directions: bad training settings, or a directions file that is missing, damaged or unfit."""
