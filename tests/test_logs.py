"""The daemon's log: a log call never raises nor shows a frame's locals, no field and no line
is sized by a client, and under systemd each line carries its journald priority."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import structlog

from jobwarden.logs import CLIENT_TEXT, FIELD_TEXT, LINE_BYTES, clip, configure_logging

SECRET = "a local no log line may show"


@pytest.fixture(autouse=True)
def restore_structlog():
    """Each test configures structlog its own way; the others get theirs back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


class Unprintable:
    """A field no renderer can show: its repr fails as rich's did on a mutated deque."""

    def __repr__(self) -> str:
        raise RuntimeError("deque mutated during iteration")

    __str__ = __repr__


def lines_of(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def fail_with_a_secret_local() -> None:
    token = SECRET  # noqa: F841
    raise OverflowError("Python int too large to convert to SQLite INTEGER")


@pytest.mark.parametrize("format", ["json", "console"])
def test_a_field_that_cannot_be_rendered_leaves_a_minimal_line_and_no_exception(format):
    stream = io.StringIO()
    configure_logging(format, "info", stream=stream)
    structlog.get_logger("t").warning("request failed", thing=Unprintable())
    (line,) = lines_of(stream)
    minimal = json.loads(line)
    assert minimal["event"] == "request failed"
    assert minimal["level"] == "warning"
    assert minimal["ts"]
    assert "deque mutated during iteration" in minimal["log_error"]


@pytest.mark.parametrize("format", ["json", "console"])
def test_an_exception_is_logged_without_its_locals_and_without_rich(format):
    stream = io.StringIO()
    configure_logging(format, "info", stream=stream)
    try:
        fail_with_a_secret_local()
    except OverflowError:
        structlog.get_logger("t").exception("request failed")
    text = stream.getvalue()
    assert "fail_with_a_secret_local" in text
    assert "OverflowError" in text
    assert SECRET not in text
    # rich draws its tracebacks in boxes.
    assert "╭" not in text and "│" not in text


def test_a_stream_that_cannot_be_written_loses_the_line_not_the_daemon():
    class Full(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

    configure_logging("json", "info", stream=Full())
    structlog.get_logger("t").info("still here")


def test_client_text_is_clipped_with_a_marker():
    kind = "k" * 51_000
    assert clip(kind) == "k" * CLIENT_TEXT + "…[50800 more chars]"
    assert clip("short") == "short"


def test_no_field_and_no_line_outgrows_its_bound():
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    log = structlog.get_logger("t")
    log.info("big field", kind="k" * 51_000)
    log.info("many fields", **{f"field{n}": "v" * 3000 for n in range(20)})
    big, many = (json.loads(line) for line in lines_of(stream))
    assert len(big["kind"]) < FIELD_TEXT + 30
    assert big["kind"].endswith("more chars]")
    assert len(json.dumps(many)) < LINE_BYTES
    assert many["event"] == "many fields" and "log_error" in many


def test_under_the_journal_each_line_starts_with_its_priority(tmp_path: Path, monkeypatch):
    with (tmp_path / "journal").open("w+") as stream:
        status = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
        configure_logging("json", "debug", stream=stream)
        log = structlog.get_logger("t")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        stream.seek(0)
        lines = stream.read().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>"]
    assert json.loads(lines[2][3:])["event"] == "w"


def test_elsewhere_lines_are_plain_json(tmp_path: Path, monkeypatch):
    # The journal connected some other stream: this one is a pipe, a file, a terminal.
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    structlog.get_logger("t").warning("w")
    (line,) = lines_of(stream)
    assert json.loads(line)["event"] == "w"


def test_a_line_outside_the_daemons_run_is_stamped_too():
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    structlog.get_logger("t").error("jobwarden could not start", error="no")
    assert json.loads(stream.getvalue())["ts"]
