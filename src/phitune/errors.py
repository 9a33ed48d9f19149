"""The one exception type the CLI turns into a one-line message and exit code 2."""


class PhituneError(Exception):
    """A problem the user can fix. The message says what is wrong, where, and the fix."""

    def __init__(self, message: str, *, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []

    def __str__(self) -> str:
        head = super().__str__()
        if not self.problems:
            return head
        return head + "\n" + "\n".join(f"  - {p}" for p in self.problems)


def refuse_non_empty(output, overwrite: bool) -> None:
    """Commands that write a directory never write over a non-empty one unless told to."""
    from pathlib import Path

    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise PhituneError(f"{output}: exists and is not empty; pass --overwrite or choose another --output")
