"""`StopCutter`: cuts a streamed text before its first stop string, and holds back what may begin one."""

from __future__ import annotations

from collections.abc import Sequence


class StopCutter:
    """Fed a text piece by piece, answers what may be shown now. Once a stop string has appeared, the text is cut
    before the earliest one and `stopped` is set. The tail that could still grow into a stop string is held back,
    so text that is shown is never taken back; `rest()` releases it when the text ends without a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.longest = max(map(len, self.stops), default=0)
        self.text = ""
        self.shown = 0  # characters of `text` handed out
        self.stopped = False

    def feed(self, piece: str) -> str:
        """What of the text may be shown now that `piece` has been added."""
        # A stop string completed by `piece` starts at most `longest - 1` characters before it.
        search_from = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        found = [i for i in (self.text.find(stop, search_from) for stop in self.stops) if i >= 0]
        if found:
            self.stopped = True
            return self._show_until(min(found))
        return self._show_until(len(self.text) - self._held_back())

    def rest(self) -> str:
        """The held-back tail, once the text has ended without a stop string."""
        return self._show_until(len(self.text))

    def _held_back(self) -> int:
        """The longest end of the text that is the start of a stop string (shorter than the stop itself)."""
        text = self.text
        return max(
            (n for stop in self.stops for n in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:n])),
            default=0,
        )

    def _show_until(self, end: int) -> str:
        shown, self.shown = self.text[self.shown : end], max(self.shown, end)
        return shown
