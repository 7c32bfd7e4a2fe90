"""Device -> host copies of recorded tensors that do not stall the step loop.

On CUDA a recorder hands each tensor it keeps to :meth:`HostCopies.to_host`, which returns a pinned host
tensor at once and queues the copy. At the end of the step the sampler calls :meth:`HostCopies.flush`: a
side stream waits for the compute stream (an event, not a host sync), copies everything queued with
non-blocking copies, marks the sources as used by that stream (``record_stream``, so the caching
allocator does not hand their memory to the next step's kernels before the copy has read it) and records
an event. The copies overlap the next step's compute.

The host tensors are valid once that event has completed. A step's records are a :class:`Records`
mapping that waits for the event on the first read of a value, so a loop that does not look at its
records while sampling never synchronises, and one that does (a callback, a widget, ``state.records``
after a hand-taken step) reads finished copies. On CPU nothing is queued: ``to_host`` copies at once.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch


class HostCopies:
    """The side stream and the copies queued during the current step (one per sampler)."""

    def __init__(self, device):
        device = torch.device(device)
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None
        self._queue: list[tuple[torch.Tensor, torch.Tensor]] = []

    def to_host(self, src: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """A host tensor that holds ``src`` once this step's copies are done: ``out`` (pinned, same shape and
        dtype) or a new pinned tensor. On CPU: ``src`` copied now (into ``out`` when given)."""
        src = src.detach()
        if not self.cuda or src.device.type != "cuda":
            return src.clone() if out is None else out.copy_(src)
        if out is None:
            out = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        self._queue.append((src, out))
        return out

    def flush(self):
        """Start the copies queued during this step on the side stream; the event they complete with, or
        ``None`` when nothing is in flight."""
        if not self._queue:
            return None
        queue, self._queue = self._queue, []
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            for src, dst in queue:
                dst.copy_(src, non_blocking=True)
                src.record_stream(self.stream)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def discard(self) -> None:
        """Forget the copies of a step that failed (its records are dropped with it)."""
        self._queue = []


class Records(Mapping):
    """A step's records by name (read-only). Values may be host tensors whose copies are still in flight:
    the first read of a value waits for them (``ready``, a CUDA event); names, ``len`` and ``in`` do not."""

    __slots__ = ("_data", "_ready")

    def __init__(self, data: dict | None = None, ready=None):
        self._data = dict(data or {})
        self._ready = ready

    def _wait(self) -> None:
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None

    def __getitem__(self, name):
        self._wait()
        return self._data[name]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, name) -> bool:
        return name in self._data

    def __reduce__(self):  # copies and pickles carry finished values, never the event
        self._wait()
        return (Records, (self._data,))

    def __repr__(self) -> str:
        state = "" if self._ready is None else ", copies in flight"
        return f"<Records {sorted(self._data)}{state}>"
