"""The one exception type the CLI turns into a one-line message and exit code 2."""


class PhituneError(Exception):
    """A problem the user can fix. The message says what is wrong, where, and the fix."""

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []

    def __str__(self) -> str:
        head = super().__str__()
        if not self.problems:
            return head
        return head + "\n" + "\n".join(f"  - {p}" for p in self.problems)

    def one_line(self) -> str:
        """The message and its problems on one line (for an API error or a job's error)."""
        return "; ".join([super().__str__(), *self.problems])


def last_line(output: str) -> str:
    """The last non-empty line of a child process's output (stripped): the reason it gives when it
    fails; "no output" when it printed nothing."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
