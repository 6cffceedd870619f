"""The base of every error a user can fix (bad config, data, mesh, checkpoint, a diverged run).
The CLIs print such errors as one line and exit 2. No heavy imports here."""


class UserError(Exception):
    """An error whose message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A gin file, binding or setting that cannot be used; the message names it and the fix."""
