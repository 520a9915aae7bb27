"""Golden bytes of the swtpm control channel (tests/vectors/ctrl/, provenance in its README).

Each transcript is replayed through the incremental decoders exactly as the bridge sees the
stream: requests from the client's chunks, replies framed by the request and the run state that
:class:`TpmRunState` follows. Every decoded message re-encodes to the captured bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from host_agent.vtpm.ctrl_codec import (
    BlobType,
    BufferSizeReply,
    CapabilityReply,
    EstablishedReply,
    GetStateBlob,
    InfoReply,
    Init,
    ReplyDecoder,
    Request,
    RequestDecoder,
    ResultReply,
    RunState,
    SetBufferSize,
    SetDataFd,
    SetLocality,
    SetStateBlob,
    StateBlobReply,
    TpmRunState,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "ctrl"


def _load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((VECTORS / f"{name}.json").read_text())
    assert doc["format"] == "vtpm-trust/ctrl-transcript/1"
    return doc


def _replay(session: dict[str, Any], state: TpmRunState) -> list[tuple[Request, Any, int]]:
    """Decode one session; return (request, reply, fds passed with the request)."""
    reqs = RequestDecoder()
    reps = ReplyDecoder()
    out: list[tuple[Request, Any, int]] = []
    pending: tuple[Request, int] | None = None
    for chunk in session["chunks"]:
        data = bytes.fromhex(chunk["hex"])
        if chunk["dir"] == "c2s":
            reqs.feed(data)
            req = reqs.next_request()
            if req is None:
                continue
            assert reqs.buffered == 0
            assert req.encode() == data, "request re-encodes to the captured bytes"
            assert pending is None
            pending = (req, chunk["fds"])
            reps.expect(req, state.running)
        else:
            reps.feed(data)
            reply = reps.next_reply()
            assert reply is not None and reps.buffered == 0
            assert reply.encode() == data, "reply re-encodes to the captured bytes"
            assert pending is not None
            state.apply(pending[0], reply)
            out.append((pending[0], reply, pending[1]))
            pending = None
    assert pending is None
    return out


def test_swtpm_ioctl_transcript_decodes_and_reencodes() -> None:
    doc = _load("swtpm_ioctl")
    state = TpmRunState()
    by_client: dict[str, list[tuple[Request, Any, int]]] = {}
    for session in doc["sessions"]:
        by_client.setdefault(session["client"], []).extend(_replay(session, state))
    assert state.state is RunState.TERMINATED

    (_, caps, _), *_ = by_client["swtpm_ioctl -c"]
    assert isinstance(caps, CapabilityReply) and caps.caps == 0xFFFF
    # -e before INIT and after --stop: a bare TPM_BAD_ORDINAL; while running: 8 bytes.
    est = by_client["swtpm_ioctl -e"]
    assert [type(r) for _, r, _ in est] == [ResultReply, EstablishedReply, ResultReply]
    assert [r.result for _, r, _ in est] == [0x0A, 0, 0x0A]
    loc_req, _, _ = by_client["swtpm_ioctl -l 0"][0]
    assert loc_req == SetLocality(0), "swtpm_ioctl sends the unpadded 1-byte locality"
    (_, bufsize, _), *_ = by_client["swtpm_ioctl -b 0"]
    assert bufsize == BufferSizeReply(0, 4096, 2808, 4096)
    (_, info, _), *_ = by_client["swtpm_ioctl --info 1"]
    assert isinstance(info, InfoReply)
    assert json.loads(info.data.rstrip(b"\0"))["TPMSpecification"]["family"] == "2.0"

    saves = [v[0] for k, v in by_client.items() if k.startswith("swtpm_ioctl --save")]
    perm, vol, save, stopped = saves
    assert isinstance(perm[1], StateBlobReply) and perm[1].result == 0
    assert perm[1].data[:8] == bytes.fromhex("0201000a00040000"), "libtpms blob magic"
    assert isinstance(save[1], StateBlobReply) and save[1].result == 0x800 and save[1].data == b""
    assert stopped[1] == ResultReply(0x0A), "GET_STATEBLOB while stopped: bare error"
    loads = [v[0] for k, v in by_client.items() if k.startswith("swtpm_ioctl --load")]
    assert isinstance(loads[0][0], SetStateBlob)
    assert loads[0][0].data == perm[1].data and loads[1][0].data == vol[1].data


def test_qemu_boot_and_save_sequence() -> None:
    (session,) = _load("qemu_boot_save")["sessions"]
    state = TpmRunState()
    seq = _replay(session, state)
    kinds = [type(req).__name__ for req, _, _ in seq]
    assert kinds == [
        "SetDataFd",
        "GetCapability",
        "Stop",
        "SetBufferSize",
        "Stop",
        "SetBufferSize",
        "Init",
        "GetTpmEstablished",
        "SetLocality",
        "GetStateBlob",
        "GetStateBlob",
        "GetStateBlob",
        "Shutdown",
    ]
    assert seq[0][2] == 1, "SET_DATAFD carries exactly one fd"
    assert seq[0][0] == SetDataFd()
    assert seq[5][0] == SetBufferSize(0xF80)
    assert seq[6][0] == Init(0)
    assert seq[8][0] == SetLocality(0, b"\0\0\0"), "QEMU pads SET_LOCALITY to 4 bytes"
    blobs = [(req, rep) for req, rep, _ in seq if isinstance(req, GetStateBlob)]
    assert [req.blob_type for req, _ in blobs] == [
        BlobType.PERMANENT,
        BlobType.VOLATILE,
        BlobType.SAVESTATE,
    ]
    assert all(req.state_flags == 1 and req.offset == 0 for req, _ in blobs)
    assert [rep.result for _, rep in blobs] == [0, 0, 0x800]
    assert state.state is RunState.TERMINATED and state.saw_get_stateblob


def test_qemu_restore_sequence() -> None:
    (session,) = _load("qemu_restore")["sessions"]
    state = TpmRunState()
    seq = _replay(session, state)
    kinds = [type(req).__name__ for req, _, _ in seq]
    assert kinds == [
        "SetDataFd",
        "GetCapability",
        "Stop",
        "SetBufferSize",
        "Stop",
        "SetBufferSize",
        "Stop",
        "SetStateBlob",
        "SetStateBlob",
        "Init",
        "Shutdown",
    ]
    sets = [req for req, _, _ in seq if isinstance(req, SetStateBlob)]
    assert [s.blob_type for s in sets] == [BlobType.PERMANENT, BlobType.VOLATILE]
    assert seq[9][0] == Init(1), "INIT after incoming migration deletes the volatile state"
    saved = _replay(_load("qemu_boot_save")["sessions"][0], TpmRunState())
    got = [rep.data for req, rep, _ in saved if isinstance(req, GetStateBlob) and rep.data]
    assert [s.data for s in sets] == got, "the restored blobs are the saved ones"


@pytest.mark.parametrize("name", ["swtpm_ioctl", "qemu_boot_save", "qemu_restore"])
def test_transcripts_have_provenance(name: str) -> None:
    doc = _load(name)
    assert "0.7.1" in doc["swtpm"] and doc["captured"] and doc["note"]
    assert (VECTORS.parent / "README.md").read_text().count("ctrl/") >= 1
