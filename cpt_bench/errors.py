"""The one exception type for bad user input: the CLI turns it into a one-line message and exit code 2."""


class BadInput(Exception):
    """A problem with what the user gave us (suite, data, option, model), stated in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
