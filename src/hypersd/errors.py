"""One exception type for problems a user can fix; the CLI prints it as one line."""


class HypersdError(Exception):
    """A problem with the user's input: the message names it and says what to do."""
