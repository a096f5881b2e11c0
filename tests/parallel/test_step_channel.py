"""``StepChannel`` publishes over the communicator's idle broadcast, outside the watchdog
(an idle server may wait for its next step for hours)."""

from __future__ import annotations

from llama_mpi.parallel.communicator import SingleProcessCommunicator
from llama_mpi.parallel.step_channel import StepChannel


class Watched(SingleProcessCommunicator):
    def __init__(self) -> None:
        super().__init__()
        self.guarded: list[str] = []
        self.idle: list[object] = []

    def _guarded(self, op, fn, *args):
        self.guarded.append(op)
        return fn(*args)

    def _idle_broadcast_object(self, obj, root):
        self.idle.append(obj)
        return obj


def test_steps_go_over_the_idle_broadcast_unguarded() -> None:
    comm = Watched()
    channel = StepChannel(comm)
    channel.publish({"step": 1})
    assert channel.receive() is None  # a world of one: the root's own object comes back
    assert comm.idle == [{"step": 1}, None]
    assert comm.guarded == []


def test_guarded_collectives_still_go_through_the_watchdog() -> None:
    comm = Watched()
    comm.broadcast_object("x")
    assert comm.guarded == ["broadcast_object"]
