"""The one exception type for bad user input: the CLI turns it into a one-line message and exit code 2."""


class BadInput(Exception):
    """A problem with what the user gave us (suite, data, option, model), stated in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class TrainingFailed(Exception):
    """A run that cannot produce a trustworthy number (non-finite loss, weights that never moved): one line, exit 1,
    no result file."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
