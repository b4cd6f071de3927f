"""The error types a user or a peer can cause.

Every error that a user can trigger (a bad config, a missing model, an exhausted
budget) derives from :class:`SecfedError` and is printed by the CLI as one line.
Every wire decoder raises :class:`MalformedMessage` and nothing else on bad bytes;
the engine then treats the sender as dropped for that round.
"""

from __future__ import annotations


class SecfedError(Exception):
    """Base class: a problem with a one-line explanation for the user."""


class ConfigError(SecfedError):
    """A configuration key or value is wrong; the message names the key."""


class DataError(SecfedError):
    """A dataset is missing, unreadable or lacks a required column."""


class ModelLoadError(SecfedError):
    """A model path is missing, or its weights fail the integrity check."""


class MalformedMessage(SecfedError):
    """A message from a peer failed validation (size, dtype, shape, tag, round, sender).

    The one documented error of every decoder. The engine drops the sender from the
    round and continues if enough clients remain.
    """


class RoundAborted(SecfedError):
    """Too few clients survived a round; no partial model update was applied."""


class BudgetExhausted(SecfedError):
    """The next round would exceed the configured privacy budget."""


class CheckpointError(SecfedError):
    """A checkpoint is missing, corrupt or belongs to another configuration."""


class DeployError(SecfedError):
    """A key file would be overwritten, a Flower process failed to start or a run did not finish."""
