"""The sans-I/O protocol: handshake frames, reply classification, frame decoding, URLs, TOTP."""

from __future__ import annotations

import base64

import orjson
import pytest

from cometstream import protocol
from cometstream.errors import CredentialsRejected, StreamError
from cometstream.events import Event
from cometstream.protocol import (
    Credentials,
    Malformed,
    auth_frames,
    check_reply,
    decode_frame,
    stream_url,
    totp_code,
)


def test_password_login_sends_five_frames_with_empty_unused_values() -> None:
    """Password auth sends username, type, password and two empty frames, in that order."""
    creds = Credentials("admin", "Password", password="p w&=\"'é", session_key="k", totp="1")
    assert auth_frames(creds) == ["admin", "Password", "p w&=\"'é", "", ""]


def test_totp_and_session_key_frames_carry_only_their_values() -> None:
    """PasswordTOTP fills password and TOTP; SessionKey fills only the session key."""
    assert auth_frames(Credentials("u", "PasswordTOTP", password="pw", totp="123456")) == [
        "u", "PasswordTOTP", "pw", "", "123456"]
    assert auth_frames(Credentials("u", "SessionKey", password="pw", session_key="sk")) == [
        "u", "SessionKey", "", "sk", ""]


def test_credentials_repr_hides_secrets() -> None:
    """A traceback showing Credentials never shows the password."""
    assert "hunter2" not in repr(Credentials("u", "Password", password="hunter2"))


@pytest.mark.parametrize("reply", ["200 OK", "200 OK\n", b"200 OK", " 200 OK "])
def test_ok_reply_accepted(reply: str | bytes) -> None:
    """Only 200 OK (whitespace tolerated) is a successful login: neither verdict is raised."""
    try:
        check_reply(reply)
    except (CredentialsRejected, StreamError) as exc:
        pytest.fail(f"{reply!r} not taken for a successful login: {exc!r}")


@pytest.mark.parametrize("reply", ["403 Unauth", "403 Unauth\n", b"403 Unauth", "403",
                                   "401 Unauthorized"])
def test_a_refusal_rejects_the_credentials(reply: str | bytes) -> None:
    """403 Unauth (or a 401/403 reply) is a rejected login."""
    with pytest.raises(CredentialsRejected):
        check_reply(reply)


@pytest.mark.parametrize("reply", ["", "200", "OK", "500 Internal", None, "<html>403</html>",
                                   "4031", b"\x00\xff"])
def test_any_other_reply_is_a_protocol_error(reply: str | bytes | None) -> None:
    """Anything else says nothing about the credentials: a StreamError, retried."""
    with pytest.raises(StreamError) as info:
        check_reply(reply)
    assert info.value.reason == "login_reply"


@pytest.mark.parametrize(("base", "expected"), [
    ("https://comet.example.com:8060/", "wss://comet.example.com:8060/api/v1/events/stream"),
    ("http://127.0.0.1:8060", "ws://127.0.0.1:8060/api/v1/events/stream"),
    ("https://h/comet/", "wss://h/comet/api/v1/events/stream"),
    ("HTTPS://h/a/b", "wss://h/a/b/api/v1/events/stream"),
    ("wss://h/api/v1/events/stream", "wss://h/api/v1/events/stream"),
])
def test_stream_url_keeps_path_prefix(base: str, expected: str) -> None:
    """http→ws, https→wss, and a reverse-proxy prefix is kept."""
    assert stream_url(base) == expected


def test_stream_url_rejects_other_schemes() -> None:
    """ftp:// and a bare host are not server URLs."""
    for bad in ("ftp://h/", "comet.example.com"):
        with pytest.raises(ValueError):
            stream_url(bad)


def test_totp_matches_rfc6238_vectors() -> None:
    """The TOTP code equals RFC 6238's SHA1 test vectors."""
    secret = base64.b32encode(b"12345678901234567890").decode()
    assert totp_code(secret, 59, digits=8) == "94287082"
    assert totp_code(secret, 1111111109, digits=8) == "07081804"
    assert totp_code(secret.lower(), 2000000000, digits=8) == "69279037"
    assert len(totp_code(secret)) == 6


def _decode(data: bytes | str) -> Event | Malformed:
    return decode_frame(data, received_at=1700000000.5, server="comet1")


def test_event_keeps_raw_bytes_for_big_ints_unicode_and_unknown_fields() -> None:
    """The event format writes the server's bytes: u64+1 ints, unicode and new fields intact."""
    raw = ('{"Actor":"zoë","Type":4201,"Timestamp":1733400000,"New":{"x":[1,2]},'
           '"Data":{"GUID":"g1","Status":5000,"TotalSize":18446744073709551616}}').encode()
    ev = _decode(raw)
    assert isinstance(ev, Event)
    assert ev.render("event") == raw
    assert ev.type_name == "SEVT_JOB_COMPLETED"
    env = ev.render("envelope")
    assert env.endswith(b',"event":' + raw + b"}")
    parsed = orjson.loads(env)
    assert parsed["server"] == "comet1" and parsed["origin"] == "stream"
    assert parsed["received_at"] == 1700000000.5 and parsed["type_name"] == "SEVT_JOB_COMPLETED"


def test_unknown_type_is_an_event_named_by_its_typestring() -> None:
    """A type this version does not know is still delivered."""
    ev = _decode(b'{"Type":4950,"TypeString":"SEVT_FUTURE_THING"}')
    assert isinstance(ev, Event)
    assert ev.type_name == "SEVT_FUTURE_THING"
    ev2 = _decode(b'{"Type":4951}')
    assert isinstance(ev2, Event) and ev2.type_name == "SEVT_UNKNOWN_4951"


def test_pretty_printed_event_becomes_one_line() -> None:
    """Line breaks between tokens are folded so JSON Lines stays one event per line."""
    ev = _decode(b'{\n  "Type": 4000,\n  "Data": {"a": "x\\ny"}\r\n}\n')
    assert isinstance(ev, Event)
    assert b"\n" not in ev.raw and b"\r" not in ev.raw
    assert orjson.loads(ev.raw) == {"Type": 4000, "Data": {"a": "x\ny"}}


@pytest.mark.parametrize(("frame", "reason"), [
    (b"not json", "invalid_json"),
    (b'{"Type":4201', "invalid_json"),
    (b"[1,2]", "not_object"),
    (b'"hello"', "not_object"),
    (b"{}", "bad_type"),
    (b'{"Type":"4201"}', "bad_type"),
    (b'{"Type":4201.5}', "bad_type"),
    (b'{"Type":true}', "bad_type"),
    (b"\xff\xfe{}", "not_utf8"),
    (b"[" * 5000 + b"]" * 5000, "too_deep"),
    (b'{"Type":4201,"Data":{},"Type":4103}', "duplicate_key"),
    (b'{"Type" :4103, "Data":{"Type":1,"Name":"Type"},\n "Type":4201}', "duplicate_key"),
    # deeper than the standard library parses (orjson does): cannot tell, so not delivered
    (b'{"Data":' + b"[" * 1010 + b'"Type"' + b"]" * 1010 + b',"Type":4201}', "too_deep"),
    # a key spelled with escapes is the same key
    (b'{"\\u0054ype":4201,"Type":4102}', "duplicate_key"),
    (b'{"Type":4201,"T\\u0079p\\u0065":4102,"Data":{}}', "duplicate_key"),
])
def test_malformed_frames_are_classified(frame: bytes, reason: str) -> None:
    """Anything but a JSON object with an integer Type is Malformed, with a bounded reason."""
    m = _decode(frame)
    assert isinstance(m, Malformed)
    assert m.reason == reason
    assert len(m.sample) < 80


def test_type_given_twice_only_at_the_top_level_is_malformed() -> None:
    """The word Type elsewhere (a nested key, a string) is not a second Type: the event is
    delivered byte for byte, routed by its one Type."""
    raw = (b'{"Type":4102,"Data":{"Sources":{"a":{"Type":"engine1/file","Name":"Type"}},'
           b'"Note":"\\"Type\\""},"Actor":"x"}')
    ev = _decode(raw)
    assert isinstance(ev, Event) and ev.raw == raw and ev.type == 4102


def test_nested_types_in_comets_key_order_take_no_second_parse(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A profile's retention ranges hold "Type" keys: a frame in Comet's key order (Type before
    Data) is told apart from one giving Type twice without parsing it again; a Type given twice
    alike is delivered (every parser reads the one the filters read); the first unlike the
    last is malformed, whichever way it is found."""
    ranges = b'{"Mode":801,"Ranges":[{"Type":900,"Jobs":5},{"Type":902,"Days":30}]}'
    comet = (b'{"Actor":"admin","OwnerOrganizationID":"","ResourceID":"alice","Type":4102,'
             b'"Timestamp":1,"TypeString":"SEVT_ACCOUNT_UPDATED","Data":{"Destinations":{"v":'
             b'{"DefaultRetention":' + ranges + b'}}}}')
    alike = b'{"Type":4102,"Data":{"Policy":' + ranges + b'},"Type" : 4102}'
    unlike = b'{"Type":4102,"Data":{"Policy":' + ranges + b'},"Type":4201}'

    def not_here(raw: bytes, type_: int) -> bool:
        raise AssertionError("parsed again")

    pad = b',"Pad":"' + b"x" * 4000 + b'"}'  # (a frame past 2 KB is judged by its head only)
    with monkeypatch.context() as m:
        m.setattr(protocol, "_types_disagree_exactly", not_here)
        for raw in (comet, alike, comet[:-1] + pad, alike[:-1] + pad):
            ev = _decode(raw)
            assert isinstance(ev, Event) and ev.raw == raw and ev.type == 4102
        for raw in (unlike, unlike[:-1] + pad, b'{"Type":4201' + pad[:-1] + b',"Type":4102}'):
            bad = _decode(raw)
            assert isinstance(bad, Malformed) and bad.reason == "duplicate_key"
    # what does not come in that order is parsed again, and judged the same way
    for raw, given_twice in (
            (b'{"Data":{"Policy":' + ranges + b'},"Type":4102}', False),
            (b'{"Actor":"Type","Type":4102,"Data":' + ranges + b'}', False),
            (b'{"Actor":"a\\"Type\\"","Type":4102,"Data":' + ranges + b',"Type":4102}', False),
            (b'{"Actor":"a{","Type":4103,"Data":' + ranges + b',"Type":4102}', True),
            (b'{"Data":{"Type":4102},"Type":4103,"Type":4102}', True),
            (b'{"\\u0054ype":4102,"Data":{"Note":"\\u003c"},"Type":4102}', False),
            (b'{"Type":4103.0,"Data":{},"Type":4102}', True)):
        got = _decode(raw)
        if given_twice:
            assert isinstance(got, Malformed) and got.reason == "duplicate_key", raw
        else:
            assert isinstance(got, Event) and got.raw == raw and got.type == 4102, raw


def test_the_type_checks_shortcuts_agree_with_a_full_parse() -> None:
    """Random frames (keys in any order, some spelled with escapes, Type given once or several
    times, nested Type keys, strings holding brackets, quotes and escapes, whitespace, past
    2 KB or not): the check with its shortcuts says what the standard library's full parse
    says, every time."""
    import json
    import random

    rng = random.Random(7)
    atoms = ["1", "-3", '"x"', '"a{b"', '"[q]"', '"\\"Type\\""', '"Type"', "true", "null",
             '"p\\\\q"']

    def key(name: str) -> str:
        text = json.dumps(name)
        return text.replace("T", "\\u0054", 1) if rng.random() < 0.2 else text

    def value(depth: int) -> str:
        r = rng.random()
        if depth > 3 or r < 0.4:
            return rng.choice(atoms)
        if r < 0.7:
            return obj(depth + 1, [])
        return "[" + ",".join(value(depth + 1) for _ in range(rng.randint(0, 3))) + "]"

    def obj(depth: int, types: list[int]) -> str:
        members = []
        for _ in range(rng.randint(0, 4)):
            name = rng.choice(["Actor", "Data", "Type", "Name"])
            members.append((key(name), str(rng.choice([1, 900])) if name == "Type"
                            and rng.random() < 0.7 else value(depth)))
        for t in types:
            members.insert(rng.randint(0, len(members)), (key("Type"), str(t)))
        ws = rng.choice(["", " ", "\n"])
        return "{" + ",".join(f"{ws}{k}{ws}:{ws}{v}" for k, v in members) + "}"

    checked = disagreed = 0
    for _ in range(3000):
        types = rng.choice([[4102], [4102, 4102], [4201, 4102], [4102, 4201, 4102], [4102, 4201]])
        raw = obj(0, types).encode() + b" " * rng.choice([0, 0, 3000])
        try:
            type_ = orjson.loads(raw)["Type"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
        if type(type_) is not int:
            continue
        exact = protocol._types_disagree_exactly(raw, type_)
        assert protocol._types_disagree(raw, type_) == exact, raw
        checked += 1
        disagreed += bool(exact)
    assert checked > 2000 and 300 < disagreed < checked - 300  # (both answers well tried)


def test_job_dedup_key_is_type_and_guid() -> None:
    """Job starts dedup by GUID, completions by GUID + EndTime (a revived job completes again);
    identical non-job events are not de-duplicated."""
    a = _decode(b'{"Type":4201,"Data":{"GUID":"abc","EndTime":7}}')
    b = _decode(b'{"Type":4201,"Timestamp":5,"Data":{"GUID":"abc","EndTime":7}}')
    revived = _decode(b'{"Type":4201,"Data":{"GUID":"abc","EndTime":99}}')
    new = _decode(b'{"Type":4200,"Data":{"GUID":"abc","EndTime":0}}')
    c = _decode(b'{"Type":4103,"Actor":"u","ResourceID":"/api/v1/x","Timestamp":5}')
    for ev in (a, b, revived, new, c):
        assert isinstance(ev, Event)
    assert a.dedup_key() == b.dedup_key() == "4201:abc:7"  # type: ignore[union-attr]
    assert revived.dedup_key() == "4201:abc:99"  # type: ignore[union-attr]
    assert new.dedup_key() == "4200:abc"  # type: ignore[union-attr]
    assert c.dedup_key() is None  # type: ignore[union-attr]


def test_redaction_keeps_integers_beyond_64_bits_wherever_they_are() -> None:
    """orjson reads an integer beyond 64 bits as a float: a redacted event holding one (in Data
    or at the top level) is re-encoded from an exact parse, never through the float."""
    from cometstream.redact import Redactor

    r = Redactor()
    for raw in (b'{"Type":4102,"Timestamp":36893488147419103232,"Data":{"TOTPKey":"S1"}}',
                b'{"Type":4102,"Data":{"A":[{"N":-9223372036854775809}],"PasswordHash":"S2"}}',
                b'{"Type":4102,"Data":{"Ratio":0.5,"N":18446744073709551616,"TOTPKey":"S3"}}'):
        ev = decode_frame(raw, received_at=0.0, server="s")
        r.apply(ev)  # type: ignore[arg-type]
        out = ev.raw  # type: ignore[union-attr]
        assert b'"[REDACTED]"' in out and b'"S' not in out, out
        for big in (b"36893488147419103232", b"-9223372036854775809", b"18446744073709551616"):
            assert (big in raw) == (big in out), out
        assert b"e+" not in out and b"E+" not in out, out


def test_redaction_keeps_every_number_as_it_came() -> None:
    """A redacted event is re-encoded; its numbers are not rewritten through a double: 1e400
    stays 1e400 (not Infinity, which is not JSON, nor null), 1e-400 is not 0.0, 1E5 is not
    100000.0, -0 is not 0; the result is valid JSON."""
    import json

    from cometstream.redact import Redactor

    numbers = b'"Inf":1e400,"NegInf":-1e400,"Tiny":1e-400,"E":1E5,"Z":-0,"Zf":-0.0,"F":0.5'
    for raw in (b'{"Type":4102,"Data":{"PasswordHash":"S",' + numbers + b"}}",
                b'{"Type":4403,"Data":{' + numbers + b',"SMTPPassword":"hunter2"}}'):
        ev = decode_frame(raw, received_at=0.0, server="s")
        Redactor().apply(ev)  # type: ignore[arg-type]
        out = ev.raw  # type: ignore[union-attr]
        assert numbers in out and b'"[REDACTED]"' in out, out
        json.loads(out, parse_constant=lambda name, out=out: pytest.fail(f"{name} in {out!r}"))


@pytest.mark.parametrize("raw", [
    b'{"Type":4102,"Data":{"PasswordHash":"S","GUID":"78e51061-0b2c","Z":-0}}',
    b'{"Type":4102,"Data":{"PasswordHash":"S","L":[1,-0]}}',
    b'{"Type":4102,"Data":{"PasswordHash":"S"},"Extra":{"N":1E5}}',
    b'{"Type":4102,"Data":{"PasswordHash":"S"},"N":18446744073709551616}',
])
def test_redaction_finds_a_rewritten_number_wherever_it_is(raw: bytes) -> None:
    """Without any other float, a negative zero integer; a float outside Data (which the
    redactor does not walk): each kept as it came."""
    from cometstream.redact import Redactor

    ev = decode_frame(raw, received_at=0.0, server="s")
    r = Redactor()
    r.apply(ev)  # type: ignore[arg-type]
    assert ev.raw == raw.replace(b'"S"', b'"[REDACTED]"')  # type: ignore[union-attr]
    assert r.exact_events == 1


def test_redaction_keeps_a_big_integer_inside_statistics_which_are_not_walked() -> None:
    from cometstream.redact import NO_SECRETS, Redactor

    assert "Statistics" in NO_SECRETS
    raw = (b'{"Type":4102,"Data":{"PasswordHash":"S","Sources":{"g":{"Statistics":'
           b'{"Size":18446744073709551616,"Note":"e+"}}}}}')
    ev = decode_frame(raw, received_at=0.0, server="s")
    Redactor().apply(ev)  # type: ignore[arg-type]
    assert ev.raw == raw.replace(b'"S"', b'"[REDACTED]"')  # type: ignore[union-attr]


def test_redaction_survives_integers_beyond_a_double_and_a_full_name_cache() -> None:
    """A 400-digit integer (parsed by the standard library) is kept exactly in a redacted
    event; and once the cache of judged key names is full, new secret names are still
    redacted (the verdict counts, not the cache)."""
    from cometstream.redact import Redactor

    r = Redactor()
    huge = b"1" * 400
    ev = decode_frame(b'{"Type":4102,"Data":{"N":' + huge + b',"TOTPKey":"S1"}}',
                      received_at=0.0, server="s")
    r.apply(ev)  # type: ignore[arg-type]
    assert huge in ev.raw and b"S1" not in ev.raw  # type: ignore[union-attr]
    r._known.update(f"id-{i}" for i in range(100_000))  # the cache is full
    ev = decode_frame(b'{"Type":4403,"Data":{"Email":{"SMTPPassword":"hunter2"}}}',
                      received_at=0.0, server="s")
    r.apply(ev)  # type: ignore[arg-type]
    assert b"hunter2" not in ev.raw  # type: ignore[union-attr]


def test_the_name_cache_starts_over_when_full_so_the_names_met_now_are_cached() -> None:
    """Ids used as keys (devices, sources, destinations) come and go over months: once the
    cache of judged names is full of old ones, it starts over, so the names of the profiles
    met now are judged once again and then matched in C, not judged at every event; and it
    never holds more than its bound."""
    from cometstream.redact import KNOWN_MAX, MARK, NO_SECRETS, Redactor

    r = Redactor()
    r.is_secret("PasswordHash")
    for i in range(KNOWN_MAX + 10):  # old ids, never met again
        r.is_secret(f"0000-{i}")
        assert len(r._known) <= KNOWN_MAX
    r.is_secret("Statistics")
    profile = {"Sources": {"6a1c-src": {"Description": "x", "ClientSecret": "s3"}},
               "PasswordHash": "h"}
    assert r._walk(profile)
    assert profile == {"Sources": {"6a1c-src": {"Description": "x", "ClientSecret": MARK}},
                       "PasswordHash": MARK}
    assert {"Sources", "6a1c-src", "Description", "ClientSecret", "PasswordHash"} <= r._known
    assert {"ClientSecret", "PasswordHash"} <= r._secret
    # the names an object may hold to be only looked into: known, neither secret nor skipped
    assert r._plain and r._plain <= r._known and not r._plain & (r._secret | NO_SECRETS)
    assert {"Sources", "6a1c-src", "Description"} <= r._plain


def test_a_secret_key_given_twice_in_one_object_leaves_no_copy() -> None:
    """JSON parsers keep the last of a key given twice; the redacted event is re-encoded from
    the parsed document, so neither value survives in its bytes."""
    from cometstream.redact import Redactor

    r = Redactor()
    for raw in (b'{"Type":4102,"Data":{"PasswordHash":"first","PasswordHash":"second"}}',
                b'{"Type":4102,"Data":{"PasswordHash" : "first","PasswordHash":"second"}}'):
        ev = decode_frame(raw, received_at=0.0, server="s")
        r.apply(ev)  # type: ignore[arg-type]
        assert b"first" not in ev.raw and b"second" not in ev.raw  # type: ignore[union-attr]


@pytest.mark.parametrize("raw", [
    # numbers as orjson writes them (exponents too), beside the secret
    (b'{"Type":4102,"Data":{"N":1.5,"PasswordHash":"S","M":-12,"E":1e-7,"F":1e+100,"Z":-0.0,'
    b'"Max":9223372036854775807,"Min":-9223372036854775808,"One":1.0}}'),
    # a secret's name as a string value, and inside a string value, quotes escaped: not keys
    (b'{"Type":4102,"Data":{"Field":"PasswordHash","Note":"\\"PasswordHash\\":\\"x\\"",'
    b'"PasswordHash":"S"}}'),
    # one name at two depths, the same value twice, and a name that only mentions a secret
    (b'{"Type":4102,"Data":{"PasswordHash":"S","Sub":{"PasswordHash":"S","L":[{"TOTPKey":"S"}]},'
    b'"PasswordFormat":12,"TOTPKey":""}}'),
    # a map under a secret's name goes whole; a secret inside Statistics stays (not walked)
    (b'{"Type":4102,"Data":{"PasswordHistory":"S","U2FRegistrations":[{"Key":"k"}],'
    b'"Sources":{"g":{"Statistics":{"Token":"T"}}}},"Timestamp":1733400000}'),
])
def test_redaction_keeps_bytes_orjson_would_write_but_the_secrets(raw: bytes) -> None:
    """Bytes exactly as orjson writes the parsed event are delivered as they came, but for the
    secrets' values: nothing else re-encoded, no number rewritten, strings that only name a
    secret kept; the parsed event is redacted as well."""
    from cometstream.redact import MARK, Redactor

    assert orjson.dumps(orjson.loads(raw)) == raw  # (the premise: such bytes)
    ev = decode_frame(raw, received_at=0.0, server="s")
    assert isinstance(ev, Event)
    r = Redactor()
    r.apply(ev)
    want = raw.replace(b'"S"', b'"[REDACTED]"').replace(b'[{"Key":"k"}]', b'"[REDACTED]"')
    assert ev.raw == want
    assert r.kept_events == r.redacted_events == 1 and r.exact_events == 0
    assert orjson.loads(ev.raw) == ev.doc and b'"S"' not in orjson.dumps(ev.doc)
    assert MARK in ev.doc["Data"].values()


def _random_profile(rng: object, depth: int = 0) -> object:
    """A random document with secrets at any depth, the same secret twice, a copy inside
    ``Statistics`` (not walked), keys whose escapes hold a secret's key and value."""
    import random

    assert isinstance(rng, random.Random)
    names = ["PasswordHash", "TOTPKey", "Name", "Sub", "Statistics", "Token", 'x"PasswordHash',
             "Pass\\word", "N", "Key", "List", "PasswordFormat"]
    r = rng.random()
    if depth > 4 or r < 0.35:
        return rng.choice(["S", "T", "[REDACTED]", "", 0, -3, 1.5, True, None, "a\"b", "é"])
    if r < 0.5:
        return [_random_profile(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(names): _random_profile(rng, depth + 1) for _ in range(rng.randrange(6))}


def test_redaction_of_random_documents_is_what_encoding_the_redacted_event_gives() -> None:
    """Whatever the document (secrets at any depth, the same secret twice, a copy inside
    ``Statistics``, which is not walked, keys with escaped quotes), the redacted event's bytes
    are orjson's encoding of the redacted document, and no walked secret survives. Seeded."""
    import random

    from cometstream.redact import MARK, Redactor

    rng = random.Random(11)
    redactor = Redactor()

    def redacted(value: object) -> object:  # the rule, written plainly
        if isinstance(value, list):
            return [redacted(v) for v in value]
        if not isinstance(value, dict):
            return value
        return {k: (MARK if redactor.is_secret(k) and v not in (None, "", [], {}, MARK)
                    else v if k == "Statistics" else redacted(v)) for k, v in value.items()}

    for _ in range(3000):
        data = _random_profile(rng)
        if not isinstance(data, dict):
            continue
        ev = _decode(orjson.dumps({"Type": 4102, "Data": data}))
        assert isinstance(ev, Event)
        redactor.apply(ev)
        assert ev.raw == orjson.dumps({"Type": 4102, "Data": redacted(data)})
    assert redactor.kept_events > 900, redactor.kept_events


def test_secrets_spliced_into_the_bytes_give_what_an_encoding_gives() -> None:
    """Where the redactor splices the secrets' replacements into the received bytes instead of
    encoding the redacted document, the bytes are the same as that encoding; where it cannot
    be sure of the places (the same text inside ``Statistics``, which is not walked, or inside
    a key spelt with an escaped quote) or there are many to look for, it declines. Seeded
    random documents: both ways taken, many times."""
    import random

    from cometstream.redact import Redactor, _spliced

    rng = random.Random(11)
    redactor = Redactor()
    ways = {"spliced": 0, "declined": 0}
    for _ in range(3000):
        data = _random_profile(rng)
        if not isinstance(data, dict):
            continue
        raw = orjson.dumps({"Type": 4102, "Data": data})
        doc = orjson.loads(raw)
        replaced: list[tuple[dict[str, object], str, object]] = []
        if not redactor._walk(doc["Data"], replaced):
            continue
        out = _spliced(raw, replaced)  # type: ignore[arg-type]
        if out is None:
            ways["declined"] += 1
        else:
            ways["spliced"] += 1
            assert out == orjson.dumps(doc)
    assert ways["spliced"] > 500 and ways["declined"] > 50, ways


@pytest.mark.parametrize("raw", [
    # the same key and value inside Statistics, which is not walked (and keeps it)
    b'{"Type":4102,"Data":{"PasswordHash":"S","Statistics":{"PasswordHash":"S"}}}',
    # a key whose escaped quote makes it end with another replaced key and value
    b'{"Type":4102,"Data":{"x\\"PasswordHash":"S","PasswordHash":"S"}}',
    # more distinct secrets than one search each is worth
    b'{"Type":4102,"Data":{"PasswordHash":"S1","TOTPKey":"S2","Token":"S3"}}',
])
def test_secrets_whose_places_the_bytes_cannot_tell_are_encoded(raw: bytes) -> None:
    from cometstream.redact import Redactor, _spliced

    doc = orjson.loads(raw)
    replaced: list[tuple[dict[str, object], str, object]] = []
    redactor = Redactor()
    assert redactor._walk(doc["Data"], replaced)
    assert _spliced(raw, replaced) is None  # type: ignore[arg-type]
    ev = _decode(raw)
    assert isinstance(ev, Event)
    redactor.apply(ev)
    assert ev.raw == orjson.dumps(ev.doc) and redactor.kept_events == 1
    assert ev.raw.count(b'"[REDACTED]"') == len(replaced)


@pytest.mark.parametrize("raw", [
    # a secret key given twice in one object (parsers keep the last)
    b'{"Type":4102,"Data":{"PasswordHash":"LEAK","Username":"u","PasswordHash":"S"}}',
    # the first copy of a duplicated Data holds a secret under a name the second lacks
    b'{"Type":4102,"Data":{"TOTPKey":"LEAK"},"Data":{"PasswordHash":"S"}}',
    # a secret's name spelt with escapes, once alone and once before a plain duplicate
    b'{"Type":4102,"Data":{"\\u0050asswordHash":"LEAK","N":1}}',
    b'{"Type":4102,"Data":{"P\\u0061sswordHash":"LEAK","PasswordHash":"S"}}',
    # escapes orjson does not write (Go's HTML-safe ones), whitespace, a decimal's zero
    b'{"Type":4102,"Data":{"Note":"a \\u0026 b \\/ c","PasswordHash":"LEAK"}}',
    b'{"Type":4102, "Data": {"PasswordHash": "LEAK"}}',
    b'{"Type":4102,"Data":{"PasswordHash":"LEAK","R":1.10}}',
])
def test_redaction_of_other_bytes_re_encodes_them(raw: bytes) -> None:
    """Bytes orjson would not write as they are (a key given twice, escapes, whitespace, a
    number written otherwise) are not kept: the event is re-encoded from the parsed, redacted
    document, so no secret survives, whatever copy or spelling held it."""
    from cometstream.redact import Redactor

    ev = decode_frame(raw, received_at=0.0, server="s")
    assert isinstance(ev, Event)
    r = Redactor()
    r.apply(ev)
    assert b"LEAK" not in ev.raw and b'"S"' not in ev.raw, ev.raw
    assert ev.raw == orjson.dumps(ev.doc) and b'"[REDACTED]"' in ev.raw
    assert r.redacted_events == 1 and r.kept_events == 0


@pytest.mark.parametrize("number", [b"1E5", b"-0", b"1e400", b"-1e400", b"1e-400",
                                    b"18446744073709551616", b"-9223372036854775809",
                                    b"2.5E-3", b"1" * 400])
def test_redaction_keeps_a_number_a_re_encoding_would_rewrite(number: bytes) -> None:
    """Beside a secret, a number orjson would write otherwise (an exponent it spells
    differently, -0, beyond a double or 64 bits) is kept as it came: the bytes are not what
    orjson writes, and the exact path keeps it."""
    from cometstream.redact import Redactor

    raw = b'{"Type":4102,"Data":{"A":[' + number + b'],"PasswordHash":"S","B":' + number + b"}}"
    ev = decode_frame(raw, received_at=0.0, server="s")
    assert isinstance(ev, Event)
    r = Redactor()
    r.apply(ev)
    assert ev.raw == raw.replace(b'"S"', b'"[REDACTED]"')
    assert r.kept_events == 0 and r.exact_events == 1


@pytest.mark.parametrize("frame", [
    b'{"Type":"4102","Data":{"PasswordHash":"LEAK-1"}}',
    b'  {"Data":{"TOTPKey":"LEAK-2"}}',
    b'{"Data":' * 1100 + b'"LEAK-3"' + b"}" * 1100,
    b'{"Type":4102,"Data":{"PasswordHash":"LEAK-4"}',
])
def test_a_bad_frame_that_looks_like_an_event_has_no_sample(frame: bytes) -> None:
    """The log's sample of a bad frame never quotes what may be an unredacted event: a frame
    that starts as a JSON object gets none (anything else keeps its first 60 characters)."""
    m = _decode(frame)
    assert isinstance(m, Malformed)
    assert m.sample == "" and "LEAK" not in m.detail
    assert _decode(b"not json at all").sample == "not json at all"  # type: ignore[union-attr]


@pytest.mark.parametrize("raw", [
    b'{"Type":4102,"Data":{"A":1e5}}', b'{"Type":4102,"Data":{"A":-2.5E-3}}',
    b'{"Type":4102,"Data":[0, 1E+400]}', b'{"Type":4102,"Data":{"A": -0 }}',
    b'{"Type":4102,"Data":[1,-0]}', b'{"Type":4102,"Data":{"A":18446744073709551616}}',
    b'{"Type":4102,"Data":{"A":-9223372036854775809}}',
])
def test_a_number_a_double_would_rewrite_is_found(raw: bytes) -> None:
    from cometstream.events import dump_json, parse_raw
    from cometstream.redact import rewrites_numbers

    assert rewrites_numbers(raw, dump_json(parse_raw(raw)))


@pytest.mark.parametrize("raw", [
    # hex GUIDs (digit, e, digit), dates and ids with "-0", decimals, -0.0 (kept by orjson)
    b'{"Type":4102,"Data":{"GUID":"78e51061-0b2c-4e5f-9e0e-12e4a5b6c7d8","D":"2024-01-05"}}',
    b'{"Type":4102,"Data":{"A":1.5,"B":-0.0,"C":-12,"D":[0,-1,2.25],"E":"x-0,"}}',
    b'{"Type":4102,"Data":{"Size":9223372036854775807,"T":1733400000}}',
])
def test_text_that_only_looks_like_such_a_number_is_not(raw: bytes) -> None:
    from cometstream.events import dump_json, parse_raw
    from cometstream.redact import rewrites_numbers

    assert not rewrites_numbers(raw, dump_json(parse_raw(raw)))


def test_a_stream_without_such_numbers_never_takes_the_slow_path() -> None:
    """The simulator's mix (account events carry whole profiles, full of hex GUIDs such as
    ``"78e51061"``): every account event is redacted with its bytes kept but for the secrets,
    none through the exact (standard library) path; one number that needs it takes it, and
    only that."""
    import orjson

    from cometstream.redact import Redactor
    from cometstream.simulator.world import World

    world = World(seed=7)
    redactor = Redactor()
    events = [_decode(orjson.dumps(world.next_event())) for _ in range(5000)]
    for ev in events:
        assert isinstance(ev, Event)
        redactor.apply(ev)
        orjson.loads(ev.raw)
    assert redactor.redacted_events >= 50, redactor.redacted_events
    assert redactor.exact_events == 0
    # (and none re-encoded at all: the simulator's bytes are what orjson writes, so each
    # account event keeps them, but for the secrets)
    assert redactor.kept_events == redactor.redacted_events
    odd = _decode(b'{"Type":4102,"Data":{"PasswordHash":"S","GUID":"78e51061","N":1E5}}')
    assert isinstance(odd, Event)
    redactor.apply(odd)
    assert redactor.exact_events == 1 and b'"N":1E5' in odd.raw
