"""The one exception type of `lexjax.data`."""
from __future__ import annotations

from lexjax.errors import UserError


class DataError(UserError, ValueError):
    """A task, split, corpus or vocabulary that cannot be used; the message names it and the fix."""
