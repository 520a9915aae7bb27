"""The soft-dirty tracker inside a TCG guest whose Debian kernel has CONFIG_MEM_SOFT_DIRTY=y.

The development and CI host kernel lacks soft-dirty, so the tracker's incremental mode is tested
where it exists: the test guest runs our tracker (from the repository, shared read-only over 9p)
against ``memwriter``, the image's ground-truth writer, which changes random pages in rounds and
reports which. After every round the incremental root must equal a full re-hash, and every page
written so far must be among the pages the tracker re-hashed.
"""

from __future__ import annotations

import json

from tests.helpers.qemu import GuestFactory

ROUNDS = 15
GUEST_SCRIPT = r"""
import json, subprocess, sys
sys.path.insert(0, "/mnt/repo")
from host_agent.memory.dirty import SoftDirtyTracker, TrackedRegion, probe_soft_dirty
from host_agent.memory import merkle

rounds = int(sys.argv[1])
w = subprocess.Popen(
    ["memwriter", "-m", "8", "-r", str(rounds), "-n", "40", "-s", "11", "-w", "-H"],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
)
ready = json.loads(w.stdout.readline())
region = TrackedRegion.process_memory(ready["pid"], int(ready["addr"], 16), ready["pages"] * 4096)
said = []
t = SoftDirtyTracker(region, workers=1, announce=said.append)
first = t.start()
out = {"probe": probe_soft_dirty().reason, "mode": first.mode, "said": said, "rounds": []}
written = set()
for r in range(rounds):
    w.stdin.write("\n"); w.stdin.flush()
    ev = json.loads(w.stdout.readline())
    written |= set(ev["pages"])
    inc = t.finish()
    full = t.full_hash()
    dirty = {p for f, n in inc.dirty for p in range(f, f + n)}
    out["rounds"].append({
        "mode": inc.mode,
        "equal": inc.leaves.root() == full.root() and inc.leaves == full,
        "changed_vs_start": sum(b - a + 1 for a, b in merkle.diff(first.leaves, full)),
        "written_so_far": len(written),
        "rehashed": inc.rehashed_pages,
        "missed": sorted(written - dirty),
    })
w.terminate()
print(json.dumps(out))
"""


def test_incremental_root_equals_full_rehash_over_many_rounds(boot_guest: GuestFactory) -> None:
    guest = boot_guest("dirty", repo=True)
    out = guest.check(f"python3 - {ROUNDS}", stdin=GUEST_SCRIPT.encode(), timeout=300)
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["mode"] == "soft-dirty", result["probe"]
    assert result["said"] == []  # no fallback announced
    assert len(result["rounds"]) == ROUNDS
    last = result["rounds"][-1]
    print(f"{ROUNDS} rounds: {last['written_so_far']} written, {last['rehashed']} re-hashed")
    for i, r in enumerate(result["rounds"]):
        assert r["mode"] == "soft-dirty"
        assert r["equal"], f"round {i + 1}: incremental root differs from a full re-hash"
        assert r["missed"] == [], f"round {i + 1}: written pages not re-hashed"
        # Everything written changed its page, and little else was re-hashed.
        assert r["changed_vs_start"] == r["written_so_far"]
        assert r["written_so_far"] <= r["rehashed"] <= r["written_so_far"] + 64
