"""`SteppedGeneration`: `transformers`' own beam search for one row, run one decoder step at a time.

The `generate` call runs in a thread of its own. A logits processor that it calls at every step hands control
back to the engine's loop and waits there until the loop asks for the next step: the two threads take turns,
so only one computes at any time, and the engine runs a beam row's steps between its own decoder steps like any
other piece of work. The result is `generate`'s, exactly (it is `generate`), on the row alone.
"""

from __future__ import annotations

import threading

import torch
from transformers import LogitsProcessor

from server.serving.model import Decoding, FrozenT5, Generation, Row


class _Cancelled(Exception):
    """Raised inside the `generate` call when the row is no longer wanted: it unwinds the call."""


class _StepGate(LogitsProcessor):
    def __init__(self, generation: SteppedGeneration) -> None:
        self.generation = generation

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.generation.pause()
        return scores


class SteppedGeneration:
    def __init__(self, model: FrozenT5, row: Row, decoding: Decoding, max_new_tokens: int) -> None:
        self._model, self._row, self._decoding, self._max_new_tokens = model, row, decoding, max_new_tokens
        self._turn = threading.Semaphore(0)  # the loop lets the call take a step
        self._paused = threading.Semaphore(0)  # the call paused at a step, or ended
        self._thread: threading.Thread | None = None
        self._cancelled = False
        self.done = False
        self.result: Generation | None = None
        self.error: BaseException | None = None

    def advance(self) -> bool:
        """Runs the call to its next step (the first includes the encoder pass); True once it has ended, with
        `result` or `error` set."""
        if self.done:
            return True
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="softserve-beam", daemon=True)
            self._thread.start()
        else:
            self._turn.release()
        self._paused.acquire()
        return self.done

    def cancel(self) -> None:
        """Unwinds the call (at its next step) and waits for its thread to end."""
        if self._thread is None or self.done:
            self.done = True
            return
        self._cancelled = True
        self._turn.release()
        self._paused.acquire()

    def pause(self) -> None:
        """In the call's thread, at every step."""
        self._paused.release()
        self._turn.acquire()
        if self._cancelled:
            raise _Cancelled

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                (self.result,) = self._model.generate(
                    [self._row], self._decoding, [self._max_new_tokens], step_gate=_StepGate(self)
                )
        except _Cancelled:
            pass
        except BaseException as error:  # reported to the loop, which fails this row only
            self.error = error
        finally:
            self.done = True
            self._paused.release()
