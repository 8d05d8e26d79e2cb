"""Errors a person can act on.

Every expected failure (bad input, bad configuration, a model that fails its integrity check) is an
`EdgeError` whose message is one line naming the thing and the reason. The CLI and the daemon print that
line; tracebacks are for bugs only.
"""
from __future__ import annotations


class EdgeError(Exception):
    """An expected failure with a one-line message naming what failed and why."""

    def __init__(self, subject: str, reason: str) -> None:
        self.subject = str(subject)
        self.reason = " ".join(str(reason).split())  # one line, whatever the cause said
        super().__init__(f"{self.subject}: {self.reason}")


class InputError(EdgeError):
    """An input (file, frame, dataset) that cannot be used: not an image, truncated, too large, ..."""


class ConfigError(EdgeError):
    """A configuration file or manifest that is wrong: names the file, the key and what is allowed."""


class ModelError(EdgeError):
    """A model that cannot be used: unknown name, hash mismatch, bad signature, no matching variant."""


class EngineError(EdgeError):
    """An inference engine that cannot load or run a model on any allowed device."""
