"""Progress bars (rich) for long vault commands, on a terminal only."""

from __future__ import annotations

import sys


class Progress:
    """Bytes and files done, rate and ETA; silent unless ``stream`` is a tty."""

    def __init__(self, stream, description: str = "", total_bytes: int | None = None) -> None:
        self._bar = None
        self.warnings: list[str] = []
        if stream is None or not stream.isatty():
            return
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)
        self._console = Console(file=stream)
        self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TextColumn("{task.fields[files]} files"),
                                 TimeRemainingColumn(), console=self._console, transient=True)
        self._task = self._bar.add_task(description, total=total_bytes, files=0)
        self._files = 0
        self._bar.start()

    def advance(self, *, bytes: int = 0, files: int = 0) -> None:
        if self._bar is not None:
            self._files += files
            self._bar.update(self._task, advance=bytes, files=self._files)

    @property
    def visible(self) -> bool:
        return self._bar is not None

    def set_total(self, total_bytes: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, total=total_bytes)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        if self._bar is not None:
            self._bar.console.print(f"[yellow]{message}[/]")
        else:
            print(f"statefs vault: {message}", file=sys.stderr)

    def done(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


