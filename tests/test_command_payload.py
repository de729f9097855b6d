"""A command kind's `payload` table: each field's type, checked at admission, so a payload
the command cannot use is refused with INVALID_REQUEST naming the field instead of running
(the demo `shell` kind used to take {"seconds": "abc"} and end `done` with no result); and a
python kind's payload told the choices of a field that takes one of a few words."""

from __future__ import annotations

from typing import Literal

import msgspec
import pytest

from jobwarden.config import load_config_text
from jobwarden.errors import ConfigError, RequestError
from tests.process import DaemonProcess, run_jobwarden
from tests.test_first_run import any_free_port

pytestmark = pytest.mark.both_stores

RENDER = """
[kinds.render]
command = ["echo", "{payload.size.width}", "{payload.title}"]
payload = { title = "string", pages = "integer", draft = "boolean", size = { width = "number" } }
"""
GOOD = {"title": "Otter", "pages": 8, "draft": False, "size": {"width": 2.5}}


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"pages": "8"}, 'payload.pages: expected an integer, got "8"'),
        ({"pages": 8.5}, "payload.pages: expected an integer, got 8.5"),
        ({"draft": 0}, "payload.draft: expected a boolean, got 0"),
        ({"title": None}, "payload.title: expected a string, got null"),
        ({"size": {"width": True}}, "payload.size.width: expected a number, got true"),
        ({"size": [1]}, "payload.size: expected an object with width, got [1]"),
        ({"size": {}}, "payload.size.width: required"),
        ({"colour": "red"}, "payload.colour: not a field of this kind (it takes title, pages,"),
        ({"title": "x" * 100}, None),
    ],
    ids=[
        "string-for-integer",
        "fraction",
        "number-for-boolean",
        "null",
        "nested",
        "array",
        "missing",
        "undeclared",
        "long-string-is-fine",
    ],
)
async def test_a_payload_is_checked_field_by_field_at_admission(
    autojump_clock, start_daemon, change, complaint
):
    daemon = await start_daemon(RENDER)
    payload = {**GOOD, **change}

    if complaint is None:
        job = await daemon.submit("render", payload)
        assert (await daemon.wait_done(job.id)).status == "done"
        return
    with pytest.raises(RequestError) as refused:
        await daemon.submit("render", payload)
    assert refused.value.body.code == "INVALID_REQUEST"
    assert refused.value.body.message.startswith(complaint)


async def test_a_long_value_is_cut_short_in_the_message(autojump_clock, start_daemon):
    daemon = await start_daemon(RENDER)
    with pytest.raises(RequestError) as refused:
        await daemon.submit("render", {**GOOD, "pages": "9" * 1000})
    assert refused.value.body.message == f'payload.pages: expected an integer, got "{"9" * 36}...'


@pytest.mark.parametrize(
    ("kind", "complaint"),
    [
        (
            'command = ["echo", "{payload.n}"]\npayload = { n = "float" }',
            "kinds.k.payload.n: expected one of string, number, integer, boolean or a table "
            'of fields; got "float"',
        ),
        (
            'command = ["echo", "{payload.n}"]\npayload = { m = "number" }',
            "kinds.k.payload: the command uses {payload.n}, which the table must declare",
        ),
        (
            'command = ["echo", "{payload.n}"]\npayload = { n = { m = "number" } }',
            "kinds.k.payload: the command uses {payload.n}, which the table must declare",
        ),
        (
            'handler = "tests.handlers:sleepy"\npayload = { n = "number" }',
            "kinds.k.payload: only a command kind declares its payload here",
        ),
    ],
    ids=["unknown-type", "template-field-undeclared", "template-field-is-a-table", "python-kind"],
)
def test_a_payload_table_the_command_cannot_use_is_a_config_error(kind, complaint):
    with pytest.raises(ConfigError) as error:
        load_config_text(f"[kinds.k]\n{kind}\n")
    assert str(error.value).startswith(complaint)


class Styled(msgspec.Struct):
    style: Literal["watercolor", "ink"]


async def styled(ctx, payload: Styled) -> str:
    return payload.style


async def test_a_python_kinds_payload_is_told_a_fields_choices(autojump_clock, start_daemon):
    daemon = await start_daemon('[kinds.styled]\nhandler = "tests.test_command_payload:styled"\n')
    with pytest.raises(RequestError) as refused:
        await daemon.submit("styled", {"style": "oil"})
    assert refused.value.body.message == (
        'payload.style: expected one of watercolor, ink; got "oil"'
    )


def test_the_demo_shell_kind_refuses_seconds_that_are_not_a_number(tmp_path):
    assert run_jobwarden("init", cwd=tmp_path).returncode == 0
    any_free_port(tmp_path / "config.toml")
    daemon = DaemonProcess.in_place(tmp_path).start()
    try:
        refused = run_jobwarden("submit", "shell", '{"seconds": "abc"}', cwd=tmp_path)
        accepted = run_jobwarden("submit", "shell", '{"seconds": 0.01}', "--watch", cwd=tmp_path)
    finally:
        daemon.close()

    assert refused.returncode == 2
    assert refused.stderr == (
        'error INVALID_REQUEST: payload.seconds: expected a number, got "abc"\n'
    )
    assert accepted.returncode == 0, accepted
    assert accepted.stdout.endswith('{\n  "slept": 0.01\n}\n')
