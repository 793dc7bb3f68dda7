"""What a bench asks of a worker while it profiles decode steps (bench/decode_profile.py): CUDA events around each
step's device work, and a torch.profiler trace of a few graph steps for the kernels that take the time.

Only while profiling: an event pair costs a few microseconds of launch. Where the host did not wait for a step's
output (a stage before the last, a TP rank > 0, async tokens) its events are read at "stop", not after the step:
reading them then would stall the next step's launch behind the device."""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch


@dataclass
class StepProfile:
    device: torch.device
    trace_after: int = 0  # graph steps that pass before the kernel trace starts
    trace_steps: int = 0  # graph steps traced; 0 traces nothing
    graph_seen: int = 0
    traced: int = 0
    kernels: dict | None = None
    _events: tuple | None = field(default=None, repr=False)
    # (log row, start, end) of steps whose output was not waited for: read once, at the end
    _unread: list = field(default_factory=list, repr=False)
    _tracer: object = field(default=None, repr=False)

    def before(self, graph: bool) -> None:
        """The step's inputs are about to be packed and copied to the device (which is idle: the start event
        runs at once, so a step's span includes its packing)."""
        if graph:
            if self.graph_seen == self.trace_after and self.trace_steps and self.device.type == "cuda":
                self._start_trace()
            self.graph_seen += 1
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events = (start, torch.cuda.Event(enable_timing=True))

    def after(self) -> None:
        """The step's device work is launched."""
        if self._events is not None:
            self._events[1].record()

    def finished(self, graph: bool, row: int | None = None) -> float:
        """The step's output was waited for: milliseconds on the device from before() to its last kernel (NaN off
        CUDA). `row`: it was not, and waiting here would stall the next step; its span is read by unread_spans()
        instead, for this row of the log (NaN now)."""
        ms = math.nan
        if self._events is not None and row is not None:
            self._unread.append((row, *self._events))
            self._events = None
        elif self._events is not None:
            start, end = self._events
            end.synchronize()
            ms, self._events = start.elapsed_time(end), None
        if graph and self._tracer is not None:
            self.traced += 1
            if self.traced == self.trace_steps:
                self._stop_trace()
        return ms

    def unread_spans(self) -> dict[int, float]:
        """Log row → device milliseconds of the steps finished without waiting."""
        spans = {}
        for row, start, end in self._unread:
            end.synchronize()
            spans[row] = start.elapsed_time(end)
        self._unread.clear()
        return spans

    def _start_trace(self) -> None:
        # attached after the graphs were captured: CUPTI still reports the kernels of their replays (a profiler
        # session before capture would silence it for the process's life)
        try:
            self._tracer = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self._tracer.start()
        except Exception as exc:  # noqa: BLE001 - a profile without kernels still has its timeline
            self._tracer, self.kernels = None, {"error": f"trace did not start: {exc}"}

    def _stop_trace(self) -> None:
        torch.cuda.synchronize(self.device)
        tracer, self._tracer = self._tracer, None
        try:
            tracer.stop()
            events = [e for e in tracer.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        except Exception as exc:  # noqa: BLE001
            self.kernels = {"error": f"trace failed: {exc}"}
            return
        self.kernels = kernel_table(events, self.traced)

    def close(self) -> dict | None:
        """The kernel table, after stopping a trace cut short (fewer steps than asked)."""
        if self._tracer is not None:
            self._stop_trace()
        return self.kernels


def kernel_table(events: list, steps: int, top: int = 15) -> dict:
    """Device time per step of the traced steps, in all and by kernel (or copy) name, largest first."""
    total: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in events:
        total[event.name] += event.device_time_total
        calls[event.name] += 1
    steps = max(1, steps)
    busy_us = sum(total.values())
    rows = [{"name": name[:100], "ms_per_step": us / steps / 1e3, "calls_per_step": calls[name] / steps,
             "share": us / busy_us if busy_us else 0.0}
            for name, us in sorted(total.items(), key=lambda item: -item[1])[:top]]
    return {"steps": steps, "busy_ms_per_step": busy_us / steps / 1e3,
            "kernels_per_step": sum(calls.values()) / steps, "top": rows}
