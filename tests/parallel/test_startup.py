"""Start-up agreement: one message per job, whichever ranks failed."""

from __future__ import annotations

import pytest

from llama_mpi.parallel.startup import StartupError, describe, job_message, run_agreed


class FakeWorld:
    """``allgather`` over ranks whose outcomes are given; this process is rank 0."""

    def __init__(self, others: list[str | None]) -> None:
        self.others = others

    def allgather(self, mine):
        return [mine, *self.others]


def test_all_ranks_well_gives_the_result() -> None:
    assert run_agreed(FakeWorld([None, None]), lambda: 42) == 42


def test_the_same_error_everywhere_is_said_once_without_ranks_or_traceback() -> None:
    msg = "3 ranks cannot split 8 attention heads evenly; valid: [1, 2, 4, 8]"

    def fail():
        raise ValueError(msg)

    with pytest.raises(StartupError) as err:
        run_agreed(FakeWorld([msg, msg]), fail)
    assert str(err.value) == msg


def test_a_failure_elsewhere_fails_here_too_naming_the_rank() -> None:
    with pytest.raises(StartupError) as err:
        run_agreed(FakeWorld([None, "x.gguf: needs about 20 GiB"]), lambda: 1)
    assert str(err.value) == "rank 2: x.gguf: needs about 20 GiB"


def test_distinct_errors_are_grouped_by_message() -> None:
    assert job_message(["a", None, "a", "b"]) == "ranks 0, 2: a\nrank 3: b"
    assert job_message([None, None]) is None


def test_a_bug_keeps_its_traceback() -> None:
    try:
        raise KeyError("boom")
    except KeyError as exc:
        text = describe(exc)
    assert text.startswith("Traceback") and "KeyError: 'boom'" in text
    assert describe(ValueError("bad key")) == "bad key"
    assert describe(ValueError("bad key"), verbose=True).startswith("ValueError: bad key")
