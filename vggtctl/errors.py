"""Typed errors: each carries the one-line message a user sees and the exit code it maps to."""

from __future__ import annotations

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 130


class VggtctlError(Exception):
    """Base class; `str(err)` is a complete one-line message naming the file and the reason."""

    exit_code = EXIT_USAGE
    said_by_rank0 = False  # a distributed run's other ranks stop with it silently: rank 0 says it


class ConfigError(VggtctlError):
    """Bad settings, options or paths given by the user (exit 2)."""


class CheckpointError(VggtctlError):
    """A checkpoint that cannot be found, read, or does not fit the model."""


class ImageError(VggtctlError):
    """One image cannot be decoded or preprocessed; fails that image, not the run."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class SidecarError(VggtctlError):
    """A sidecar cannot be read or does not follow the format."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
