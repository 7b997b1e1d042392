"""The built-in sinks on their own: file rotation and recovery, stdout output."""

from __future__ import annotations

import io
import os
from pathlib import Path

import orjson
import pytest

from cometstream.config import Section
from cometstream.errors import ConfigError, SinkError
from cometstream.events import Event
from cometstream.protocol import decode_frame
from cometstream.sinks.file import FileSink
from cometstream.sinks.stdout import StdoutSink, pretty_line


def _event(i: int, *, type_: int = 4201, pad: int = 0) -> Event:
    doc = {"Actor": "a", "Type": type_, "Timestamp": 1733400000 + i,
           "Data": {"GUID": f"job-{i:05d}", "Username": "alice", "Status": 5000,
                    "Classification": 4001, "StartTime": 1733396400, "EndTime": 1733400000,
                    "UploadSize": 1234567, "Pad": "x" * pad}}
    ev = decode_frame(orjson.dumps(doc), received_at=1733400001.25, server="comet1")
    assert isinstance(ev, Event)
    return ev


def _sink(path: Path, **opts: object) -> FileSink:
    return FileSink.from_config("f", Section({"path": str(path), "format": "event", **opts},
                                             "sinks.f"))


async def test_file_sink_appends_and_never_truncates(tmp_path: Path) -> None:
    """Existing data stays; new lines are appended after it; a missing folder is created."""
    path = tmp_path / "deep" / "dir" / "events.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"old":1}\n')
    sink = _sink(path)
    await sink.open()
    await sink.send([_event(1), _event(2)])
    await sink.aclose()
    lines = path.read_bytes().splitlines()
    assert lines[0] == b'{"old":1}' and len(lines) == 3
    assert orjson.loads(lines[2])["Data"]["GUID"] == "job-00002"
    assert (tmp_path / "x" / "new.jsonl").parent.exists() is False
    sink2 = _sink(tmp_path / "x" / "new.jsonl")
    await sink2.open()
    await sink2.aclose()
    assert (tmp_path / "x" / "new.jsonl").exists()


async def test_file_sink_repairs_a_torn_last_line(tmp_path: Path) -> None:
    """A file whose last line lost its newline (crash) gets one before new lines are added."""
    path = tmp_path / "e.jsonl"
    path.write_bytes(b'{"whole":1}\n{"torn":')
    sink = _sink(path)
    await sink.open()
    await sink.send([_event(1)])
    await sink.aclose()
    lines = path.read_bytes().splitlines()
    assert lines[:2] == [b'{"whole":1}', b'{"torn":']
    assert orjson.loads(lines[2])["Type"] == 4201


async def test_file_sink_rotates_by_size_and_keeps_n(tmp_path: Path) -> None:
    """rotate_bytes splits at line boundaries; keep bounds the old files; no line is lost."""
    path = tmp_path / "e.jsonl"
    sink = _sink(path, rotate_bytes=4096, keep=2, fsync="never")
    await sink.open()
    events = [_event(i, pad=300) for i in range(60)]
    for i in range(0, 60, 7):
        await sink.send(events[i:i + 7])
    await sink.aclose()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["e.jsonl", "e.jsonl.1", "e.jsonl.2"]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 4096
    kept = (path.with_name("e.jsonl.2").read_bytes() + path.with_name("e.jsonl.1").read_bytes()
            + path.read_bytes()).splitlines()
    guids = [orjson.loads(line)["Data"]["GUID"] for line in kept]
    # the newest events, contiguous and in order, end with the last one written
    assert guids == [f"job-{i:05d}" for i in range(60 - len(guids), 60)]


async def test_file_sink_fills_a_file_to_exactly_rotate_bytes_then_rotates(
        tmp_path: Path) -> None:
    """A batch that ends exactly at ``rotate_bytes`` is written whole into the file; the next
    line starts the next file. A batch that crosses it is split at the line that would."""
    path = tmp_path / "e.jsonl"
    line = len(_event(0, pad=4000).raw) + 1
    sink = _sink(path, rotate_bytes=4 * line, keep=3, fsync="never")
    await sink.open()
    await sink.send([_event(i, pad=4000) for i in range(4)])  # exactly the limit
    assert path.stat().st_size == 4 * line and not path.with_name("e.jsonl.1").exists()
    await sink.send([_event(4, pad=4000)])
    assert path.with_name("e.jsonl.1").stat().st_size == 4 * line
    await sink.send([_event(i, pad=4000) for i in range(5, 10)])  # crosses it
    await sink.aclose()
    sizes = [p.stat().st_size for p in (path.with_name("e.jsonl.1"), path)]
    assert sizes == [4 * line, 2 * line]
    guids = [orjson.loads(x)["Data"]["GUID"] for p in (path.with_name("e.jsonl.2"),
             path.with_name("e.jsonl.1"), path) for x in p.read_bytes().splitlines()]
    assert guids == [f"job-{i:05d}" for i in range(10)]


async def test_file_sink_write_error_is_retryable(tmp_path: Path) -> None:
    """An OSError while writing (here: the folder became a file) is a retryable SinkError."""
    path = tmp_path / "d" / "e.jsonl"
    sink = _sink(path)
    sink.reopen()
    await sink.open()
    await sink.aclose()
    path.unlink()
    path.parent.rmdir()
    path.parent.write_text("not a dir")
    with pytest.raises(SinkError) as info:
        await sink.open()
    assert info.value.retryable and "e.jsonl" in str(info.value)
    with pytest.raises(SinkError) as info:
        await sink.send([_event(1)])
    assert info.value.retryable
    await sink.aclose()


def test_file_sink_options_are_validated() -> None:
    """rotate_bytes too small and an unknown key are config errors naming the key."""
    with pytest.raises(ConfigError) as info:
        _sink(Path("/tmp/x"), rotate_bytes=10)
    assert info.value.key == "sinks.f.rotate_bytes"
    with pytest.raises(ConfigError) as info:
        _sink(Path("/tmp/x"), rotate=10)
    assert info.value.key == "sinks.f.rotate"


async def test_stdout_sink_writes_json_lines_when_not_a_tty() -> None:
    """Not a terminal: one JSON document per line in the configured format."""
    buf = io.BytesIO()
    sink = StdoutSink("out", format="envelope", stream=buf)
    await sink.open()
    await sink.send([_event(1), _event(2)])
    await sink.aclose()
    lines = buf.getvalue().splitlines()
    assert [orjson.loads(x)["type_name"] for x in lines] == ["SEVT_JOB_COMPLETED"] * 2


async def test_stdout_sink_pretty_lines_on_request() -> None:
    """pretty = true gives one readable line per event, without colour when not a terminal."""
    buf = io.BytesIO()
    sink = StdoutSink("out", pretty=True, stream=buf)
    await sink.open()
    await sink.send([_event(1)])
    await sink.aclose()
    line = buf.getvalue().decode()
    assert line.count("\n") == 1 and "\x1b[" not in line
    assert "SEVT_JOB_COMPLETED" in line and "alice" in line and "STOP_SUCCESS" in line


def test_pretty_line_strips_terminal_escapes_from_server_data() -> None:
    """Text from the server cannot inject terminal escape sequences into the console."""
    doc = {"Type": 4103, "Actor": "evil\x1b[2J", "ResourceID": "/api\x07"}
    ev = decode_frame(orjson.dumps(doc), received_at=1.0, server="s")
    assert isinstance(ev, Event)
    line = pretty_line(ev, colour=False)
    assert "\x1b" not in line and "\x07" not in line
    assert "SEVT_ACCOUNT_LOGIN" in line


async def test_stdout_closed_is_a_permanent_error() -> None:
    """A closed stdout (a pipe whose reader went away) does not retry forever."""
    r, w = os.pipe()
    os.close(r)
    out = os.fdopen(w, "wb")
    sink = StdoutSink("out", stream=out)
    await sink.open()
    with pytest.raises(SinkError) as info:
        await sink.send([_event(1)])
    assert not info.value.retryable
    await sink.aclose()
    try:
        out.close()
    except BrokenPipeError:
        pass


@pytest.mark.parametrize("data", [
    {"GUID": "g", "Classification": {"odd": 1}, "Status": [1], "StartTime": "x", "EndTime": None},
    {"GUID": None, "Username": 5, "Classification": 4001, "StartTime": 2**60, "EndTime": 2**62},
])
def test_pretty_line_survives_odd_job_fields(data: dict[str, object]) -> None:
    """Fields of unexpected types or sizes never make the console sink fail."""
    doc = {"Type": 4201, "Timestamp": 99999999999999999, "Data": data}
    raw = orjson.dumps(doc).replace(b'"Type":4201', b'"Type":4201,"Big":' + b"9" * 40)
    ev = decode_frame(raw, received_at=1733400000.0, server="s")
    assert isinstance(ev, Event)
    assert "SEVT_JOB_COMPLETED" in pretty_line(ev, colour=True)


async def test_fsync_always_covers_both_files_of_a_rotation(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With fsync = always, the part of a batch written before a rotation is fsynced too."""
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = tmp_path / "e.jsonl"
    sink = _sink(path, rotate_bytes=4096, fsync="always")
    await sink.open()
    await sink.send([_event(i, pad=300) for i in range(8)])  # ~3.5 KB: one file
    await sink.send([_event(i, pad=300) for i in range(8, 12)])  # crosses the rotation
    inodes = {path.stat().st_ino, path.with_name("e.jsonl.1").stat().st_ino}
    await sink.aclose()
    assert inodes <= set(synced)


ROLLBACK_SCRIPT = r"""
import asyncio, resource, signal, sys, orjson
from cometstream.config import Section
from cometstream.errors import SinkError
from cometstream.protocol import decode_frame
from cometstream.sinks.file import FileSink

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG instead of being killed
def ev(i):
    return decode_frame(orjson.dumps({"Type": 4201, "Data": {"GUID": f"g{i}", "Pad": "x" * 500}}),
                        received_at=1.0, server="s")
async def main(path):
    sink = FileSink.from_config("f", Section({"path": path, "format": "event"}, "sinks.f"))
    await sink.open()
    await sink.send([ev(i) for i in range(4)])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4000, hard))   # the next batch cannot fit
    try:
        await sink.send([ev(i) for i in range(4, 8)])
        print("no error")
    except SinkError as exc:
        print("retryable" if exc.retryable else "permanent")
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))   # space again: the retry
    await sink.send([ev(i) for i in range(4, 8)])
    await sink.aclose()
asyncio.run(main(sys.argv[1]))
"""


def test_failed_write_is_rolled_back_so_the_retry_writes_each_line_once(tmp_path: Path) -> None:
    """A write that fails half-way (file size limit: EFBIG) leaves no partial line; the retry
    of the same batch then writes every line exactly once."""
    import subprocess
    import sys

    path = tmp_path / "e.jsonl"
    proc = subprocess.run([sys.executable, "-c", ROLLBACK_SCRIPT, str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "retryable"
    guids = [orjson.loads(line)["Data"]["GUID"] for line in path.read_bytes().splitlines()]
    assert guids == [f"g{i}" for i in range(8)]
