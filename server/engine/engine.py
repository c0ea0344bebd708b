"""`Engine`: the loop that serves rows of any tasks and kinds, one pass at a time.

    requests ──▶ inbox ──▶ Scheduler.schedule ──▶ Plan ──▶ ModelRunner.run ──▶ Outcome ──▶ Scheduler.update ──▶ emit
                 (thread-safe)   (policy: places,          (the model: encoder passes,        (tokens, scores,
                                  budget, memory)            pieces, one decoder step)          finish reasons)

Every pass runs one decoder step for the generate rows in place (greedy and sampled rows, streaming or not)
and, besides it, at most a budget of other model work: joining rows' encoder passes, classify scoring and beam
search steps, cut into pieces (server/engine/scheduler.py says how). So no request, of any kind, holds the
other rows' tokens for longer than one budget.

`submit` and `cancel` are thread-safe; `run` is the loop, in its own thread (or process), and the only code that
touches the model. `emit` gets each pass's events in order, with the pass's stats.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from server.engine.limits import EngineLimits
from server.engine.protocol import Cancel, EngineRequest, Event, Failed, Finished, GenerateRow, StepStats
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler
from server.serving.model import FrozenT5

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # how long an idle loop blocks on its inbox before looking at its stop flag again
Emit = Callable[[list[Event], StepStats], None]


class Engine:
    def __init__(self, model: FrozenT5, limits: EngineLimits, emit: Emit) -> None:
        self.model = model
        self.limits = limits
        self.scheduler = Scheduler(limits, model.eos_token_id)
        self.runner = ModelRunner(model)
        self._emit = emit
        self._inbox: queue.SimpleQueue[list[EngineRequest] | Cancel] = queue.SimpleQueue()
        self._busy = False  # whether the last pass left anything to report (so that an idle pass reports zeros once)
        # Grammars compile on a thread of their own, off the loop; their rows join the scheduler once compiled.
        self._compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="softserve-grammar")
        self._compiling: dict[int, tuple[Future[None], GenerateRow]] = {}

    # Thread-safe entry points.

    def submit(self, requests: list[EngineRequest]) -> None:
        """One inbox item: the loop takes a submission's rows together, so they join the same pass (an ensemble's
        members share its encoder pass and decoder steps)."""
        self._inbox.put(list(requests))

    def cancel(self, request_ids: list[int]) -> None:
        self._inbox.put(Cancel(list(request_ids)))

    # The loop.

    @torch.inference_mode()
    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                self._take_inbox(block=not self.scheduler.has_work)
                self._pass()
        finally:
            self._shut_down()

    @torch.inference_mode()
    def run_once(self) -> None:
        """One pass of the loop without waiting (tests and benches drive the engine pass by pass)."""
        self._take_inbox(block=False)
        self._pass()

    @property
    def idle(self) -> bool:
        """Nothing queued, compiling, waiting or running."""
        return self._inbox.empty() and not self.scheduler.has_work and not self._compiling

    def _pass(self) -> None:
        plan = self.scheduler.schedule(time.monotonic())
        if plan.empty and not self._busy and not self.scheduler.unsent:
            return
        outcome = self.runner.run(plan)
        events, stats = self.scheduler.update(plan, outcome)
        self._busy = not plan.empty
        self._emit(events, stats)

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
            while True:
                if isinstance(item, Cancel):
                    self._cancel(item.request_ids)
                else:
                    self.scheduler.add([request for request in item if self._ready(request)])
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        self._take_compiled()

    def _ready(self, request: EngineRequest) -> bool:
        """A row whose grammar has not been compiled waits for it off the scheduler (its compiling goes on)."""
        if not isinstance(request, GenerateRow) or request.grammar is None:
            return True
        if self.model.grammars.compiled(request.grammar):
            return True
        compiling = self._compiler.submit(self.model.grammars.compile, request.grammar)
        self._compiling[request.request_id] = (compiling, request)
        return False

    def _take_compiled(self) -> None:
        for request_id, (compiling, request) in list(self._compiling.items()):
            if not compiling.done():
                continue
            del self._compiling[request_id]
            error = compiling.exception()
            if error is None:
                self.scheduler.add([request])
            else:
                self.scheduler.unsent.append(
                    Failed(request_id, "invalid_input", f"the grammar does not compile: {error}")
                )

    def _cancel(self, request_ids: list[int]) -> None:
        for request_id in request_ids:
            if request_id in self._compiling:
                _, request = self._compiling.pop(request_id)
                self.scheduler.unsent.append(Finished(request.request_id, "cancelled"))
        self.scheduler.cancel(request_ids)

    def _shut_down(self) -> None:
        """The loop stopped: every row still here ends, so no caller waits forever."""
        self._take_inbox(block=False)
        self._compiler.shutdown(wait=False, cancel_futures=True)
        for request_id in list(self._compiling):
            self._cancel([request_id])
        self.runner.close()
        events, stats = self.scheduler.shut_down()
        if events:
            self._emit(events, stats)
