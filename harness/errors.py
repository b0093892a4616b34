"""The one exception type for problems a user can fix (bad file, bad key, bad shape).

The CLI turns it into one line on stderr and exit code 2; library callers catch it by type.
"""


class HarnessError(Exception):
    """A user-facing problem: the message names the file, key or tensor and what was expected."""
