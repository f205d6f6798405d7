"""The one exception type users see: its message is a single line naming the input and the problem."""


class LstmInferError(ValueError):
    """A bad model, checkpoint, option or input text. ``str(err)`` is one line, fit for a CLI."""
