"""gig's errors: one base, :class:`GigError`, and a kind per cause.

Everything a user can cause (a setting, a file, a model, the state of a run directory) raises a
kind of :class:`GigError`; the command line catches that base alone and prints its message in
one line (exit status 2), while anything else is a bug and shows its traceback. Each kind also
derives from the built-in exception it refines, so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import os


class GigError(Exception):
    """Base of every error a user can cause and fix; the message says what to change."""


class ConfigError(GigError, ValueError):
    """A setting or argument with a wrong type or out of range: names field, value and rule."""


class InputError(GigError, ValueError):
    """Images, labels, dictionaries or activations that cannot be analysed as given."""


class ModelLoadError(GigError, RuntimeError):
    """A model or its weights could not be built or loaded."""


class LayerNotFoundError(GigError, KeyError):
    """A layer name that the model does not have; the message lists the closest valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class LayerNotAnalysedError(LayerNotFoundError, ConfigError):
    """A layer that the run does not analyse; the message names the run's layers. Both a
    :class:`LayerNotFoundError` and a :class:`ConfigError` (every command asked for such a layer
    raises this one kind, through :meth:`gig.store.RunStore.analysed`)."""


class LayerUsageError(GigError, RuntimeError):
    """A layer that cannot be analysed (reused module, output changed in place, odd shape)."""


class RunMismatchError(GigError, RuntimeError):
    """A run directory that is incomplete, belongs to other settings, or lacks an artefact."""


class DamagedArtefactError(RunMismatchError):
    """An artefact whose content no longer matches its checksum, or that cannot be parsed;
    ``path`` names it (``gig run --verify`` recomputes what wrote it)."""

    def __init__(self, path, message: str) -> None:
        self.path = os.fspath(path)
        super().__init__(message)


class RunBusyError(GigError, RuntimeError):
    """Another process is computing in the run directory."""


class ImageLoadError(GigError):
    """An image file could not be decoded into an RGB picture."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")
