"""The one exception type for a user's mistake."""


class UserInputError(ValueError):
    """Bad input from a user: a missing or corrupt file, a wrong shape, a prompt outside the volume...

    The CLI prints ``error: <message>`` on one line and exits with code 2; the MONAI Label app turns it
    into an HTTP 422 JSON answer. Anything else that escapes is a bug in this project.
    """
