"""Config decoding: every error names its key path."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from types import UnionType
from typing import Any, Literal, Union

import msgspec
import pytest

from jobwarden.config import (
    Config,
    check_handlers,
    format_duration,
    load_config,
    load_config_text,
    parse_duration,
)
from jobwarden.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30), ("15m", 900), ("2h", 7200), ("7d", 604800), ("1h30m", 5400)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


def test_off_means_never():
    assert parse_duration("off") == float("inf")
    assert format_duration(float("inf")) == "off"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[kinds.storybook]\nhandler = "a:b"\ntimeout = "fast"',
            'kinds.storybook.timeout: expected a duration like "15m", got "fast"',
        ),
        ('[kinds.s]\nhandler = "a:b"\nbogus = 1', "kinds.s.bogus: unknown key"),
        ("[daemon]\nmax_concurrent_jobs = 0", "daemon.max_concurrent_jobs: Expected `int` >= 1"),
        (
            "[daemon]\nshutdown_grace = 30",
            'daemon.shutdown_grace: expected a duration like "15m", got 30',
        ),
        ('[retry]\nbackoff = ["1s", "soon"]', "retry.backoff.1: expected a duration"),
        (
            '[store]\nsynchronous = "normal-ish"',
            'store.synchronous: expected one of OFF, NORMAL, FULL, EXTRA; got "normal-ish"',
        ),
        (
            '[limits]\ncredits = "lots"',
            'limits.credits: expected a whole number or unlimited; got "lots"',
        ),
        (
            '[http]\nlisten = "127.0.0.1:70000"',
            'http.listen: expected "host:port" (port 0 to 65535) or "", got "127.0.0.1:70000"',
        ),
        ("surprise = 1", "surprise: unknown key"),
        ('[kinds.s]\ntimeout = "1m"', "kinds.s: set exactly one of handler or command"),
        ('[kinds.s]\nhandler = "no-colon"', 'kinds.s.handler: expected "package.module:function"'),
        ("[kinds.s]\ncommand = []", "kinds.s.command: needs at least the program"),
        ("[kinds.s\n", "not valid TOML"),
        (
            '[admission]\nidempotency_window = "off"',
            'admission.idempotency_window: "off" would hold',
        ),
        ("[services.llm]\nmax_units = 0", "services.llm.max_units: Expected `float` > 0.0"),
        ("[services.llm]\nmax_units = inf", "services.llm.max_units: expected a finite number"),
        ("[services.llm]\nmax_units = nan", "services.llm.max_units: Expected `float` > 0.0"),
    ],
    ids=[
        "bad-duration",
        "unknown-kind-key",
        "zero-slots",
        "number-as-duration",
        "bad-backoff-entry",
        "bad-synchronous",
        "bad-credits",
        "port-out-of-range",
        "unknown-top-key",
        "no-handler",
        "handler-format",
        "empty-command",
        "broken-toml",
        "endless-idempotency-window",
        "zero-max-units",
        "infinite-max-units",
        "nan-max-units",
    ],
)
def test_errors_name_the_key(toml, message):
    with pytest.raises(ConfigError) as error:
        load_config_text(toml)
    assert message in str(error.value)


def literal_keys() -> Iterator[tuple[str, tuple[Any, ...]]]:
    """Every key of the config whose value is one of a fixed set of words, with the words."""
    for section in msgspec.structs.fields(Config):
        tp = typing.get_type_hints(Config)[section.name]
        if not (isinstance(tp, type) and issubclass(tp, msgspec.Struct)):
            continue
        for key, key_type in typing.get_type_hints(tp).items():
            options = (
                typing.get_args(key_type)
                if typing.get_origin(key_type)
                in (
                    Union,
                    UnionType,
                )
                else (key_type,)
            )
            for option in options:
                if typing.get_origin(option) is Literal:
                    yield f"{section.name}.{key}", typing.get_args(option)


@pytest.mark.parametrize(
    ("key", "choices"), list(literal_keys()), ids=[key for key, _ in literal_keys()]
)
def test_a_word_outside_a_keys_choices_is_told_the_choices(key, choices):
    section, name = key.split(".")
    with pytest.raises(ConfigError) as error:
        load_config_text(f'[{section}]\n{name} = "sideways"\n')
    listed = choices[0] if len(choices) == 1 else f"one of {', '.join(choices)}"
    assert str(error.value).startswith(f"{key}: expected ")
    assert str(error.value).endswith(f'{listed}; got "sideways"')


def test_the_shipped_config_loads_and_its_handlers_import():
    config = load_config("config.toml")
    check_handlers(config)
    assert config.daemon.max_concurrent_jobs == 2
    assert config.retry.backoff == [0, 30, 120]
    assert {"storybook", "shell"} <= set(config.kinds)


def test_unimportable_handler_is_named():
    config = load_config_text('[kinds.x]\nhandler = "no.such.module:run"')
    with pytest.raises(ConfigError, match=r"kinds\.x\.handler: cannot import"):
        check_handlers(config)


def test_kind_retry_policy_overrides_defaults():
    config = load_config_text(
        '[kinds.a]\nhandler = "a:b"\nmax_attempts = 2\n[kinds.b]\nhandler = "a:b"\nbackoff = ["1s"]'
    )
    assert config.retry_policy("a").max_attempts == 2
    assert config.retry_policy("a").backoff == [0, 30, 120]
    assert config.retry_policy("b").backoff == [1]
    assert config.retry_policy("b").max_attempts == 4
