"""The one error type a user can cause; the CLI prints it as a single line."""


class ConversionError(ValueError):
    """A problem with the user's input or environment, stated in words a user understands."""
