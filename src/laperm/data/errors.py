"""The single exception type raised for user-facing data problems."""


class DataError(Exception):
    """A dataset could not be found, verified or decoded.

    The message is one sentence that names the problem and how to fix it,
    so command-line front ends can print it as-is without a traceback.
    """
