"""host_agent.service.relay_errors: bridges' own counters become totals that never go down."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from host_agent.service.relay_errors import RelayErrorTally

VM = "6B1D3A52-7C36-4E0E-9A31-0A9C2F4F7E11"


def test_increases_add_and_repeated_reports_do_not() -> None:
    t = RelayErrorTally()
    t.update(VM, "i1", {"swtpm_gone": 1})
    t.update(VM, "i1", {"swtpm_gone": 1})
    t.update(VM, "i1", {"swtpm_gone": 3, "qemu_io": 1})
    assert t.counts() == {(VM.lower(), "swtpm_gone"): 3, (VM.lower(), "qemu_io"): 1}
    assert t.total(VM) == 4 and t.total(VM.lower()) == 4
    assert t.total("other") == 0


def test_a_restarted_bridge_adds_to_what_its_predecessor_reported() -> None:
    t = RelayErrorTally()
    t.update(VM, "first", {"swtpm_gone": 5})
    t.update(VM, "second", {"swtpm_gone": 2})  # new instance: starts from zero
    assert t.counts() == {(VM.lower(), "swtpm_gone"): 7}
    t.update(VM, "second", {"swtpm_gone": 1})  # went down under the same id: restarted too
    assert t.counts() == {(VM.lower(), "swtpm_gone"): 8}


@pytest.mark.parametrize("counts", [{"k": -1}, {"k": 1.5}, {"k": True}, {"": 1}, {"k": "1"}])
def test_bad_counts_are_refused_and_change_nothing(counts: dict[str, object]) -> None:
    t = RelayErrorTally()
    t.update(VM, "i", {"k": 2})
    with pytest.raises(ValueError, match="relay error"):
        t.update(VM, "i", counts)  # type: ignore[arg-type]
    assert t.counts() == {(VM.lower(), "k"): 2}


reports = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.dictionaries(st.sampled_from(["x", "y"]), st.integers(0, 50), max_size=2),
    ),
    max_size=30,
)


@given(reports)
def test_totals_never_go_down(seq: list[tuple[str, dict[str, int]]]) -> None:
    t = RelayErrorTally()
    before: dict[tuple[str, str], int] = {}
    for instance, counts in seq:
        t.update(VM, instance, counts)
        now = t.counts()
        assert all(now.get(k, 0) >= n for k, n in before.items())
        assert all(now.get((VM.lower(), kind), 0) >= n for kind, n in counts.items())
        before = now
