"""Configuration: validation with dotted keys, secrets from every source, CLI exit 2."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from cometstream.cli import main
from cometstream.config import load_config, parse_config
from cometstream.constants import SEVT
from cometstream.errors import ConfigError
from cometstream.sinks import resolve_sink_class

BASE = """
[server]
url = "https://comet.example.com:8060/"
username = "cometstream"
password = "pw"

[state]
dir = "{state}"

[sinks.out]
type = "stdout"
"""


def _cfg(**sections: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "server": {"url": "http://127.0.0.1:8060/", "username": "u", "password": "pw"},
        "sinks": {"out": {"type": "stdout"}},
    }
    for k, v in sections.items():
        doc[k] = v
    return doc


def _error(doc: dict[str, Any], env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, env=env or {}, resolve_sink=resolve_sink_class)
    return info.value


def test_example_config_is_valid(tmp_path: Path) -> None:
    """config.example.toml, shipped with every key, loads as is."""
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "config.example.toml", env={"COMETSTREAM_PASSWORD": "x"},
                      resolve_sink=resolve_sink_class)
    assert cfg.server.ws_url == "wss://comet.example.com:8060/api/v1/events/stream"
    # under the units stdout is the journal: the example writes events to a file only
    assert [(s.name, s.type) for s in cfg.sinks] == [("archive", "file")]


def test_the_example_edited_as_documented_takes_the_units_credential(tmp_path: Path) -> None:
    """config.example.toml with url, username and sinks edited (operations.md) and the password
    in a systemd credential loads with that password: no password source is left set."""
    root = Path(__file__).resolve().parent.parent
    text = (root / "config.example.toml").read_text()
    text = text.replace('url = "https://comet.example.com:8060/"', 'url = "https://c.test/"')
    conf = tmp_path / "config.toml"
    conf.write_text(text)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "password").write_text("from the unit\r\n")
    cfg = load_config(conf, env={"CREDENTIALS_DIRECTORY": str(creds)},
                      resolve_sink=resolve_sink_class)
    assert cfg.server.password is not None
    assert (cfg.server.password.reveal(), cfg.server.password.source) == ("from the unit",
                                                                          "credential")


def test_a_missing_password_file_beside_a_credential_says_how_to_use_it(tmp_path: Path) -> None:
    """The first source that is set wins: a password_file that is set must exist, and when a
    credential is loaded the error says to remove password_file."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "password").write_text("pw")
    doc = _cfg()
    del doc["server"]["password"]
    doc["server"]["password_file"] = str(tmp_path / "missing")
    err = _error(doc, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert str(err) == (f"server.password_file: file not found: {tmp_path / 'missing'}; a systemd "
                        "credential 'password' is loaded: remove password_file to use it")


def test_defaults_follow_the_contract() -> None:
    """Unset keys take the documented defaults; name defaults to the URL's host."""
    cfg = parse_config(_cfg(), env={}, resolve_sink=resolve_sink_class)
    assert cfg.server.name == "127.0.0.1"
    assert cfg.server.auth_type == "Password" and cfg.server.tls_verify
    assert (cfg.stream.connect_timeout, cfg.stream.ping_interval, cfg.stream.ping_timeout) == (10, 20, 20)
    assert cfg.stream.idle_timeout == 0 and cfg.stream.max_message_bytes == 16777216
    assert cfg.http.listen == "127.0.0.1:9780" and cfg.shutdown_timeout == 10
    sink = cfg.sinks[0]
    assert (sink.format, sink.buffer, sink.when_full, sink.types) == ("envelope", 10000, "block", None)


@pytest.mark.parametrize(("doc", "key", "words"), [
    (_cfg(stream={"ping_intervall": 5}), "stream.ping_intervall", "did you mean"),
    (_cfg(bogus={}), "bogus", "unknown key"),
    (_cfg(stream={"connect_timeout": "10"}), "stream.connect_timeout", "expected a number"),
    (_cfg(stream={"connect_timeout": 0}), "stream.connect_timeout", "must be > 0"),
    (_cfg(stream={"backoff_initial": 5, "backoff_max": 1}), "stream.backoff_max", ">= backoff_initial"),
    (_cfg(stream={"max_message_bytes": 1.5}), "stream.max_message_bytes", "integer"),
    (_cfg(log={"level": "verbose"}), "log.level", "expected one of"),
    (_cfg(http={"listen": "9780"}), "http.listen", "HOST:PORT"),
    (_cfg(resync={"enabled": "yes"}), "resync.enabled", "true or false"),
    (_cfg(sinks={}), "sinks", "no sink"),
    (_cfg(sinks={"out": {"type": "stdout", "types": ["SEVT_JOB_COMPLETD"]}}),
     "sinks.out.types[0]", 'did you mean "SEVT_JOB_COMPLETED"'),
    (_cfg(sinks={"out": {"type": "stdout", "types": [42]}}), "sinks.out.types[0]", "4000-4999"),
    (_cfg(sinks={"out": {"type": "stdout", "types": []}}), "sinks.out.types", "empty list"),
    (_cfg(sinks={"out": {"type": "stdout", "when_full": "drop"}}), "sinks.out.when_full", "drop_newest"),
    (_cfg(sinks={"out": {"type": "stdout", "buffer": 0}}), "sinks.out.buffer", "between 1 and"),
    (_cfg(sinks={"out": {"type": "file"}}), "sinks.out.path", "required"),
    (_cfg(sinks={"out": {"type": "file", "path": "/tmp/x", "fsync": "sometimes"}}),
     "sinks.out.fsync", "always, batch, never"),
    (_cfg(sinks={"out": {"type": "file", "path": "/tmp/x", "colour": True}}), "sinks.out.colour",
     "unknown key"),
    (_cfg(sinks={"out": {"type": "carrier-pigeon"}}), "sinks.out.type", "unknown sink type"),
    (_cfg(sinks={"bad name": {"type": "stdout"}}), "sinks.bad name", "sink names"),
])
def test_bad_values_name_the_dotted_key(doc: dict[str, Any], key: str, words: str) -> None:
    """Each problem is one ConfigError that names the key and says what is wrong."""
    err = _error(doc)
    assert err.key == key
    assert words in str(err)
    assert "\n" not in str(err)


def test_bad_url_is_reported() -> None:
    """A URL that is not http(s) with a host names server.url."""
    for url in ("ftp://h/", "comet", "http://:80/", "http://h:99999/"):
        doc = _cfg()
        doc["server"]["url"] = url
        assert _error(doc).key == "server.url"


def test_filter_accepts_names_and_numbers() -> None:
    """types mixes SEVT names (any case) and numbers, including ones this version lacks."""
    doc = _cfg(sinks={"out": {"type": "stdout", "types": ["SEVT_JOB_COMPLETED", "sevt_account_new", 4990]}})
    cfg = parse_config(doc, env={}, resolve_sink=resolve_sink_class)
    assert cfg.sinks[0].types == {SEVT["SEVT_JOB_COMPLETED"], SEVT["SEVT_ACCOUNT_NEW"], 4990}


def test_password_sources_and_precedence(tmp_path: Path) -> None:
    """env wins, then inline, then password_file (only its last newline stripped), then credentials dir."""
    pw_file = tmp_path / "pw"
    pw_file.write_text("  spaced pass \n")
    doc = _cfg()
    del doc["server"]["password"]
    doc["server"]["password_file"] = str(pw_file)
    cfg = parse_config(doc, env={}, resolve_sink=resolve_sink_class)
    assert cfg.server.password is not None and cfg.server.password.reveal() == "  spaced pass "
    cfg = parse_config(doc, env={"COMETSTREAM_PASSWORD": "from-env"},
                       resolve_sink=resolve_sink_class)
    assert cfg.server.password is not None and cfg.server.password.reveal() == "from-env"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "password").write_text("from-credential\n")
    del doc["server"]["password_file"]
    cfg = parse_config(doc, env={"CREDENTIALS_DIRECTORY": str(creds)},
                       resolve_sink=resolve_sink_class)
    assert cfg.server.password is not None and cfg.server.password.reveal() == "from-credential"
    assert "from-credential" not in repr(cfg)


@pytest.mark.parametrize(("text", "secret"), [
    ("p w \n", "p w "), ("p w\r\n", "p w"), ("p w", "p w"), ("p\nw\n\n", "p\nw\n"),
    ("p w\r", "p w"), ("p\r\nw\r\n", "p\nw"),
])
def test_every_secret_file_loses_only_its_final_line_break(tmp_path: Path, text: str,
                                                            secret: str) -> None:
    """The server's password_file and a Kafka sink's sasl_password_file are read by one rule:
    read as text (\\r\\n and \\r are line breaks), the one final line break goes, everything else
    is the secret."""
    path = tmp_path / "secret"
    path.write_bytes(text.encode())
    doc = _cfg()
    del doc["server"]["password"]
    doc["server"]["password_file"] = str(path)
    doc["sinks"] = {"bus": {"type": "kafka", "bootstrap_servers": "127.0.0.1:9092",
                            "topic": "t", "security_protocol": "SASL_PLAINTEXT",
                            "sasl_mechanism": "PLAIN", "sasl_username": "u",
                            "sasl_password_file": str(path)}}
    cfg = parse_config(doc, env={}, resolve_sink=resolve_sink_class)
    assert cfg.server.password is not None and cfg.server.password.reveal() == secret
    from cometstream.sinks import build_sink

    sink = build_sink(cfg.sinks[0])
    assert sink.security["sasl_plain_password"] == secret  # type: ignore[attr-defined]


def test_missing_password_file_and_missing_password() -> None:
    """A missing password_file, or no password at all, is a clear error on the right key."""
    doc = _cfg()
    del doc["server"]["password"]
    assert _error(doc).key == "server.password"
    doc["server"]["password_file"] = "/nonexistent/pw"
    err = _error(doc)
    assert err.key == "server.password_file" and "not found" in str(err)


def test_totp_secret_required_and_validated(tmp_path: Path) -> None:
    """PasswordTOTP needs a base32 secret; the code is computed at each login."""
    doc = _cfg()
    doc["server"]["auth_type"] = "PasswordTOTP"
    assert _error(doc).key == "server.totp_secret_file"
    doc["server"]["totp_secret"] = "not base32 !!"
    assert "base32" in str(_error(doc))
    doc["server"]["totp_secret"] = base64.b32encode(b"12345678901234567890").decode()
    cfg = parse_config(doc, env={}, resolve_sink=resolve_sink_class)
    assert cfg.server.totp_now(59) == "287082"


def test_session_key_auth(tmp_path: Path) -> None:
    """SessionKey auth needs a session key, from a file or the environment."""
    doc = _cfg()
    doc["server"]["auth_type"] = "SessionKey"
    del doc["server"]["password"]
    assert _error(doc).key == "server.session_key_file"
    cfg = parse_config(doc, env={"COMETSTREAM_SESSION_KEY": "sk-1"},
                       resolve_sink=resolve_sink_class)
    assert cfg.server.session_key is not None and cfg.server.session_key.reveal() == "sk-1"


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    """password_file and sink paths resolve next to the config file, not the working dir."""
    (tmp_path / "pw").write_text("secret\n")
    conf = tmp_path / "c.toml"
    conf.write_text(BASE.replace('password = "pw"', 'password_file = "pw"').format(state="state")
                    + '\n[sinks.f]\ntype = "file"\npath = "out/events.jsonl"\n')
    cfg = load_config(conf, env={}, resolve_sink=resolve_sink_class)
    assert cfg.server.password is not None and cfg.server.password.reveal() == "secret"
    assert cfg.state.dir == tmp_path / "state"
    f = next(s for s in cfg.sinks if s.name == "f")
    assert Path(f.options["path"]) == Path("out/events.jsonl")


def test_check_prints_ok_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """cometstream check on a good file prints ok."""
    conf = tmp_path / "c.toml"
    conf.write_text(BASE.format(state=tmp_path))
    assert main(["check", "-c", str(conf)]) == 0
    assert capsys.readouterr().out.strip() == "ok"


@pytest.mark.parametrize("command", ["check", "run"])
def test_bad_config_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          command: str) -> None:
    """check and run both exit 2 with one line naming the key, and no traceback."""
    conf = tmp_path / "c.toml"
    conf.write_text(BASE.format(state=tmp_path) + '\n[stream]\nping_timeout = -1\n')
    assert main([command, "-c", str(conf)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "stream.ping_timeout" in err and "Traceback" not in err


@pytest.mark.parametrize(("content", "words"), [
    ("[server\nurl=1", "invalid TOML"),
    (None, "no such file"),
])
def test_unreadable_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   content: str | None, words: str) -> None:
    """A missing file or broken TOML is one line and exit 2."""
    conf = tmp_path / "c.toml"
    if content is not None:
        conf.write_text(content)
    assert main(["check", "-c", str(conf)]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown subcommand is a usage error."""
    assert main(["frobnicate"]) == 2
    assert main([]) == 2


def test_a_password_of_the_wrong_type_is_not_echoed() -> None:
    """password = 84736251 (unquoted) is an error that does not print the number."""
    doc = _cfg()
    doc["server"]["password"] = 84736251
    err = _error(doc)
    assert err.key == "server.password" and "84736251" not in str(err)


def test_credentials_in_the_url_are_refused() -> None:
    """user:password@ in server.url would end up in logs: refused with a pointer."""
    doc = _cfg()
    doc["server"]["url"] = "https://admin:hunter2@comet.example.com/"
    err = _error(doc)
    assert err.key == "server.url" and "hunter2" not in str(err)


def test_every_broken_section_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check lists one line per problem, across sections and sinks."""
    conf = tmp_path / "c.toml"
    conf.write_text(BASE.format(state=tmp_path) + """
[stream]
ping_timeout = -1
[log]
level = "loud"
[sinks.f]
type = "file"
""")
    assert main(["check", "-c", str(conf)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3
    assert [ln.split(":")[2].strip() for ln in lines] == [
        "stream.ping_timeout", "log.level", "sinks.f.path"]


def test_every_problem_of_one_table_is_reported(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Several problems in one table (a sink's, the stream's) are all listed in one run of
    check, each once; a key taken out for being wrong is not then reported as missing."""
    conf = tmp_path / "c.toml"
    conf.write_text(BASE.format(state=tmp_path) + """
[stream]
ping_interval = "often"
ping_timeout = -1
[sinks.con]
type = "stdout"
format = "xml"
pretty = "maybe"
bogus = 1
[sinks.f]
type = "file"
path = ""
""")
    assert main(["check", "-c", str(conf)]) == 2
    keys = [ln.split(":")[2].strip() for ln in capsys.readouterr().err.strip().splitlines()]
    assert keys == ["stream.ping_interval", "stream.ping_timeout", "sinks.con.format",
                    "sinks.con.pretty", "sinks.con.bogus", "sinks.f.path"]


async def test_file_sink_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    """A relative sink path is resolved next to the config file, whatever the working dir."""
    from cometstream.sinks import build_sink

    conf = tmp_path / "c.toml"
    conf.write_text(BASE.format(state="state")
                    + '\n[sinks.f]\ntype = "file"\npath = "out/events.jsonl"\n')
    cfg = load_config(conf, env={}, resolve_sink=resolve_sink_class)
    sink = build_sink(next(s for s in cfg.sinks if s.name == "f"))
    assert sink.path == tmp_path / "out" / "events.jsonl"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("where", "key", "words"), [
    ("state", "state.dir", "{f} is not a directory"),
    ("state-under", "state.dir", "cannot create {f}/state: {f} is not a directory"),
    ("sink-under", "sinks.f.path", "cannot create {f}/events.jsonl: {f} is not a directory"),
    ("sink-dir", "sinks.f.path", "{d} is a directory"),
    ("dead-letter-under", "sinks.f.dead_letter",
     "cannot create {f}/dead.jsonl: {f} is not a directory"),
])
def test_check_tests_the_places_run_writes_to(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              where: str, key: str, words: str) -> None:
    """check fails (exit 2, one line naming the key, "not a directory") for a state.dir or a
    file sink path that run could not create, instead of saying ok."""
    f = tmp_path / "a-file"
    f.write_text("")
    d = tmp_path / "a-dir"
    d.mkdir()
    state = {"state": f, "state-under": f / "state"}.get(where, tmp_path / "state")
    path = {"sink-under": f / "events.jsonl", "sink-dir": d}.get(where, tmp_path / "ev.jsonl")
    dead = f / "dead.jsonl" if where == "dead-letter-under" else tmp_path / "dead.jsonl"
    conf = tmp_path / "c.toml"
    conf.write_text(BASE.format(state=state) + f'\n[sinks.f]\ntype = "file"\npath = "{path}"\n'
                    f'dead_letter = "{dead}"\n')
    conf.chmod(0o600)  # (it holds the password: no warning about it)
    assert main(["check", "-c", str(conf)]) == 2
    err = capsys.readouterr().err
    assert err == f"cometstream: config: {key}: {words.format(f=f, d=d)}\n"


def test_run_words_a_state_dir_that_is_a_file_like_check(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """run exits 2 on a state.dir that is a file, saying "not a directory" as check does."""
    f = tmp_path / "a-file"
    f.write_text("")
    conf = tmp_path / "c.toml"
    conf.write_text(BASE.format(state=f))
    conf.chmod(0o600)
    assert main(["run", "-c", str(conf)]) == 2
    assert capsys.readouterr().err == f"cometstream: config: state.dir: {f} is not a directory\n"


def test_section_older_names_str_and_bool_still_read_options() -> None:
    """A third-party sink written against ``Section.str``/``Section.bool`` keeps working."""
    from cometstream.config import Section

    opts = Section({"url": "https://x.example/", "tls_verify": False}, "sinks.old")
    assert opts.str("url", required=True) == "https://x.example/"
    assert opts.bool("tls_verify", True) is False
    opts.done()
    new = Section({"url": 1}, "sinks.new")
    with pytest.raises(ConfigError, match=r"sinks\.new\.url: expected a string"):
        new.string("url")
    assert Section({}, "s").boolean("flag", True) is True
