from __future__ import annotations

import pytest

from plugboard_server.engine.stops import StopMatcher


def _run(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool, list[str]]:
    m = StopMatcher(stops)
    emitted = []
    for p in pieces:
        out, stopped = m.push(p)
        emitted.append(out)
        if stopped:
            return "".join(emitted), True, emitted
    emitted.append(m.flush())
    return "".join(emitted), False, emitted


def test_no_stops_passes_text_through():
    assert _run((), ["ab", "cd"]) == ("abcd", False, ["ab", "cd", ""])


def test_stop_inside_one_delta_truncates_before_it():
    text, stopped, _ = _run(("END",), ["hello END world"])
    assert (text, stopped) == ("hello ", True)


@pytest.mark.parametrize(
    "pieces", [["hel", "lo E", "N", "D more"], ["h", "e", "l", "l", "o", " ", "E", "N", "D"]]
)
def test_stop_split_across_deltas_is_never_emitted(pieces):
    text, stopped, emitted = _run(("END",), pieces)
    assert (text, stopped) == ("hello ", True)
    assert all("E" not in e for e in emitted)


def test_partial_match_that_fails_is_released():
    text, stopped, emitted = _run(("ENDS",), ["a EN", "D", "x"])
    assert (text, stopped) == ("a ENDx", False)
    assert emitted[0] == "a "  # "EN" held back while it could still become "ENDS"


def test_earliest_of_several_stops_wins():
    assert _run(("world", "lo"), ["hello world"])[:2] == ("hel", True)


def test_held_text_is_flushed_at_the_end():
    assert _run(("\n\n",), ["line\n"]) == ("line\n", False, ["line", "\n"])
