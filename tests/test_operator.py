"""The operator's first hour: the documented install, followed step by step and run as the units
run it (a dynamic user, the credential in $CREDENTIALS_DIRECTORY, systemd's $NOTIFY_SOCKET, the
units' umask, system call filter and address families), the foreground try as oneself, and what
``check`` and ``run`` say when something is wrong.

systemd itself does not run here: ``tests/unit_sandbox.py`` applies a unit's settings to a
process (as root: it drops to the dynamic user's uid), and a private folder stands in for the
machine's ``/etc`` and ``/var/lib`` (a config's ``/var/lib/cometstream`` is rewritten to it, as
systemd's ``StateDirectory=`` would provide it, and its ``[http] listen`` port to a free one:
the machine's, not the operator's edits).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cometstream.cli import main
from cometstream.simulator import Simulator

from .conftest import (
    PASSWORD,
    USER,
    cli_env,
    make_config,
    run_cli,
    running,
    toml_str,
    wait_until,
    write_config,
)

ROOT = Path(__file__).resolve().parent.parent
SANDBOX = Path(__file__).resolve().parent / "unit_sandbox.py"
#: the uid systemd would give the units' dynamic user (they come from 61184-65519)
DYNAMIC_UID = 61234
#: the command the install links to /usr/local/bin, which the units' ExecStart= runs
INSTALLED = "/usr/local/bin/cometstream"
EXAMPLE_URL = 'url = "https://comet.example.com:8060/"'
EXAMPLE_USER = 'username = "cometstream"'


# --- the machine ---------------------------------------------------------------------------------
def _reachable(path: Path) -> bool:
    """Whether a user with no privileges (the dynamic user: "others") can reach ``path``."""
    try:
        p = path.resolve()
        return all(d.stat().st_mode & 0o001 for d in p.parents) and bool(
            p.stat().st_mode & 0o005)
    except OSError:
        return False


def _interpreter() -> tuple[str, str]:
    """A Python that the dynamic user can run, and the PYTHONPATH that gives it this checkout
    and its dependencies (the test's own interpreter may be in root's home)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths += [str(ROOT), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if not all(_reachable(Path(p)) for p in paths):
        pytest.skip("this checkout or its virtualenv is not readable by other users")
    for python in (sys.executable, f"/usr/bin/python{version}"):
        if _reachable(Path(python)):
            return python, os.pathsep.join(dict.fromkeys(paths))
    pytest.skip(f"no Python {version} that other users can run")


@pytest.fixture
def machine() -> Iterator[Path]:
    """A folder standing in for the machine's /etc, /var/lib and /run (root's, mode 0755)."""
    if os.geteuid() != 0:
        pytest.skip("imitating a unit's dynamic user needs root (to drop to its uid)")
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    root = Path(tempfile.mkdtemp(prefix="cometstream-machine-"))
    root.chmod(0o755)
    for d in ("etc/systemd/system", "var/lib", "run/credentials"):
        (root / d).mkdir(parents=True)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _on(root: Path, text: str, dirs: str = "etc|var/lib|run") -> str:
    """Paths of the machine in ``text`` (a command line, a unit setting) moved into ``root``."""
    return re.sub(rf"(?<![\w/])/({dirs})/", lambda m: f"{root}/{m.group(1)}/", text)


def _machine_config(root: Path, path: Path, http_port: int) -> None:
    """What the test machine puts in place of the real one's, in a config: the folder systemd
    gives as the state directory, a free port."""
    text = path.read_text()
    text = re.sub(r'(?<![\w/])/var/lib/cometstream', f"{root}/var/lib/cometstream", text)
    text = re.sub(r'listen = "127\.0\.0\.1:\d+"', f'listen = "127.0.0.1:{http_port}"', text)
    path.write_text(text)  # (the file keeps its mode and owner)


def _expand_syscalls(name: str, seen: set[str]) -> set[str]:
    if name in seen:
        return set()
    seen.add(name)
    if not name.startswith("@"):
        return {name}
    out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if item and not item.startswith("#"):
            calls |= _expand_syscalls(item, seen)
    return calls


def _sandbox(props: dict[str, list[str]]) -> dict[str, Any]:
    """unit_sandbox.py's settings for a unit's (or a systemd-run's) properties."""
    def yes(key: str) -> bool:
        return bool(props.get(key)) and props[key][-1] in ("yes", "true", "1", "on")

    out: dict[str, Any] = {"umask": props.get("UMask", ["0022"])[-1]}
    if yes("DynamicUser"):
        out["uid"] = DYNAMIC_UID
        out["no_new_privs"] = True
    if yes("NoNewPrivileges"):
        out["no_new_privs"] = True
    if props.get("SystemCallFilter"):
        allow: set[str] = set()
        deny: set[str] = set()
        for line in props["SystemCallFilter"]:
            negate = line.startswith("~")
            for item in line.lstrip("~").split():
                (deny if negate else allow).update(_expand_syscalls(item, set()))
        out["allow"] = sorted(allow - deny)
        name = props.get("SystemCallErrorNumber", [""])[-1]
        out["errno"] = getattr(errno, name) if name else None
    out["mdwe"] = yes("MemoryDenyWriteExecute")
    if props.get("RestrictAddressFamilies"):
        out["families"] = props["RestrictAddressFamilies"][-1].split()
    return out


def _unit_props(text: str, instance: str = "") -> dict[str, list[str]]:
    """A unit file's [Service] settings (``%i`` expanded), each with all its values."""
    props: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            props.setdefault(key, []).append(value.replace("%i", instance))
    return props


@dataclass
class Started:
    """A process started as a unit starts it."""

    proc: asyncio.subprocess.Process
    notify: socket.socket | None = None
    messages: list[str] = field(default_factory=list)

    async def until(self, predicate: Any, timeout: float = 30.0) -> None:
        assert self.notify is not None
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while not predicate(self.messages):
                self.messages.append((await loop.sock_recv(self.notify, 4096)).decode())

    async def finish(self, sig: int | None = signal.SIGTERM) -> tuple[int, str, str]:
        """Its exit code, stdout and stderr, once ended (by ``sig``, or None: by itself)."""
        try:
            if self.proc.returncode is None and sig is not None:
                self.proc.send_signal(sig)
            out, err = await asyncio.wait_for(self.proc.communicate(), 30)
        finally:
            if self.notify is not None:
                self.notify.close()
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
        assert self.proc.returncode is not None
        return self.proc.returncode, out.decode(), err.decode()


async def _start(root: Path, props: dict[str, list[str]], argv: list[str], *,
                 unit: str, notify: bool = False) -> Started:
    """``argv`` (``INSTALLED`` for the command, machine paths in it) run with ``props``: the
    state directory and the credentials prepared as systemd prepares them, the environment it
    gives (NOTIFY_SOCKET bound here), the sandbox applied."""
    python, pythonpath = _interpreter()
    settings = _sandbox(props)
    uid = settings.get("uid", 0)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": pythonpath,
           "HOME": "/", "INVOCATION_ID": "0" * 32}
    for state in props.get("StateDirectory", []):  # created for the user, the parents root's
        path = root / "var/lib" / state
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, uid, uid)
        path.chmod(int(props.get("StateDirectoryMode", ["0755"])[-1], 8))
        env["STATE_DIRECTORY"] = str(path)
    loads = props.get("LoadCredentialEncrypted", []) + props.get("LoadCredential", [])
    if loads:
        creds = root / "run/credentials" / unit
        creds.mkdir()
        for item in loads:
            name, _, source = item.partition(":")
            # (decrypted by systemd, as root: the test's stand-in for an encrypted file is the
            # plain text, see _encrypt)
            (creds / name).write_bytes(Path(_on(root, source)).read_bytes())
            os.chown(creds / name, uid, uid)
            (creds / name).chmod(0o400)
        os.chown(creds, uid, uid)
        creds.chmod(0o500)
        env["CREDENTIALS_DIRECTORY"] = str(creds)
    sock = None
    if notify:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"cometstream-operator-test-{os.getpid()}-{unit}"
        sock.bind("\0" + name)
        sock.setblocking(False)
        env["NOTIFY_SOCKET"] = "@" + name
    assert argv[0] == INSTALLED, argv
    command = [python, "-m", "cometstream", *(_on(root, a) for a in argv[1:])]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SANDBOX), json.dumps(settings), "--", *command, env=env,
        cwd="/", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    return Started(proc, sock)


# --- the documented steps ------------------------------------------------------------------------
def _blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, re.DOTALL)


def _install_block(text: str) -> str:
    found = [b for b in _blocks(text) if "install -d" in b and "systemctl" in b]
    assert len(found) == 1, found
    return found[0]


def _lines(block: str) -> list[str]:
    """The block's command lines, continuation lines joined."""
    return block.replace("\\\n", " ").strip().splitlines()


def _encrypt(root: Path, line: str) -> None:
    """``... | systemd-creds encrypt --name=NAME - PATH``: the test's stand-in for the
    encrypted file is the password itself (root's, 0600), which _start "decrypts"."""
    m = re.search(r"systemd-creds encrypt --name=(\w+) - (\S+?);?(?:\s|$)", line)
    assert m is not None and m.group(1) == "password", line
    target = Path(_on(root, m.group(2)))
    target.write_text(PASSWORD)
    target.chmod(0o600)


def _systemd_run(line: str) -> tuple[dict[str, list[str]], list[str]]:
    """``sudo systemd-run [OPTIONS] -p K=V ... COMMAND ARGS``: the properties and the command."""
    words = shlex.split(line, comments=True)
    assert words[:2] == ["sudo", "systemd-run"], words
    props: dict[str, list[str]] = {}
    i = 2
    while words[i].startswith("-"):
        if words[i] in ("-p", "--property"):
            key, _, value = words[i + 1].partition("=")
            props.setdefault(key, []).append(value)
            i += 2
        elif words[i].startswith("--property="):
            key, _, value = words[i].removeprefix("--property=").partition("=")
            props.setdefault(key, []).append(value)
            i += 1
        else:
            assert words[i] in ("--quiet", "--pipe", "--wait", "--collect"), words[i]
            i += 1
    return props, words[i:]


def _shell(root: Path, line: str) -> None:
    """A plain step (``install``, ``sed``), run as root with the machine's paths moved."""
    command = _on(root, line, "etc").replace("sudo ", "")  # (not a config's /var/lib)
    subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=ROOT, check=True,
                   timeout=60)


def _sudoedit(root: Path, line: str, sim_url: str, http_port: int) -> Path:
    """The operator's one edit, [server]: url and username (the file keeps its mode)."""
    path = Path(_on(root, shlex.split(line, comments=True)[1]))
    text = path.read_text()
    assert EXAMPLE_URL in text and EXAMPLE_USER in text
    path.write_text(text.replace(EXAMPLE_URL, f'url = "{sim_url}"')
                    .replace(EXAMPLE_USER, f"username = {toml_str(USER)}"))
    _machine_config(root, path, http_port)
    return path


async def _follow(root: Path, block: str, sim: Simulator) -> dict[str, Any]:
    """Every step of an install block, in order. Returns what the check step printed and the
    unit started by the last step, running."""
    done: dict[str, Any] = {}
    http_port = _free_port()
    for line in _lines(block):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if "python3 -m venv" in line or words[:2] == ["sudo", "ln"]:
            # the virtualenv and the link: this checkout, run as INSTALLED (see _start)
            assert "/opt/cometstream" in line, line
            if words[:2] == ["sudo", "ln"]:
                assert words[-1] == INSTALLED, words
        elif "systemd-creds encrypt" in line:
            _encrypt(root, line)
        elif words[0] == "sudoedit":
            done["config"] = _sudoedit(root, line, sim.url, http_port)
        elif words[:2] == ["sudo", "systemd-run"]:
            props, command = _systemd_run(line)
            started = await _start(root, props, command, unit="run-check.service")
            done["check"] = await started.finish(None)
        elif words[:2] == ["sudo", "systemctl"]:
            m = re.search(r"enable --now (\S+)$", line)
            assert m is not None, line
            unit = m.group(1)
            installed = root / "etc/systemd/system" / re.sub(r"@\w+", "@", unit)
            installed = installed.with_name(installed.name + ".service") \
                if not installed.name.endswith(".service") else installed
            instance = unit.partition("@")[2].removesuffix(".service")
            props = _unit_props(installed.read_text(), instance)
            started = await _start(root, props, shlex.split(props["ExecStart"][-1]),
                                   unit=unit, notify=True)
            done["unit"], done["unit_props"] = started, props
        elif words[0] in ("sudo", "sed"):
            _shell(root, line)
        else:
            raise AssertionError(f"a documented step this test does not know: {line}")
    return done


def test_the_install_is_stated_once_the_same_in_readme_and_operations() -> None:
    """README and docs/operations.md give the very same install, with the config readable by
    the units' dynamic user (0755, 0644) and the password only as a credential."""
    readme = _install_block((ROOT / "README.md").read_text())
    ops = _install_block((ROOT / "docs" / "operations.md").read_text())
    assert readme == ops
    assert "install -d -m 0755 /etc/cometstream" in ops and "0750" not in ops
    assert "install -m 0644 config.example.toml /etc/cometstream/config.toml" in ops
    assert "COMETSTREAM_PASSWORD" not in ops and "systemd-creds encrypt --name=password" in ops


async def _events_written(path: Path, sim: Simulator, started: Started) -> list[bytes]:
    """Events emitted until the file sink has some (the daemon must be connected)."""
    await started.until(lambda ms: any(m.startswith("STATUS=connected") for m in ms))
    sim.emit_many(300)
    await wait_until(lambda: path.exists() and path.stat().st_size > 0, timeout=20,
                     what=f"events in {path}")
    return path.read_bytes().splitlines()


@pytest.mark.parametrize("unit", ["cometstream", "cometstream@comet1"])
async def test_the_documented_install_starts_as_the_unit_runs_it(
        sim: Simulator, machine: Path, unit: str) -> None:
    """Every step of the install in docs/operations.md (of the template unit: its instance
    steps after the first ones), run against the simulator as the units run: check as the
    unit's dynamic user with its credential logs in; the unit starts as that user (READY=1,
    STATUS=connected), writes the example's file sink into its state directory, and SIGTERM
    exits 0; ``systemctl reload`` (the check, then SIGHUP) as the unit runs it ends in
    READY=1. Nothing is edited beyond [server] and the credential."""
    ops = (ROOT / "docs" / "operations.md").read_text()
    block = _install_block(ops)
    if unit != "cometstream":  # the template: the first two steps, then the instance's
        first = [ln for ln in _lines(block) if "venv" in ln or " ln " in ln or "install -d" in ln]
        template = next(b for b in _blocks(ops) if "cometstream@comet1" in b)
        block = "\n".join([*first, *_lines(template)]) + "\n"
    done = await _follow(machine, block, sim)
    code, out, err = done["check"]
    assert code == 0, out + err
    assert out.startswith("ok: logged in to ") and "ok: admin API" in out, out
    started: Started = done["unit"]
    try:
        await started.until(lambda ms: "READY=1" in ms)
        state = machine / "var/lib" / done["unit_props"]["StateDirectory"][-1]
        lines = await _events_written(state / "events.jsonl", sim, started)
        assert lines and all(line.startswith(b'{"') for line in lines)
        assert (state / "events.jsonl").stat().st_uid == DYNAMIC_UID  # (the dynamic user's)
        # systemctl reload: ExecReload='s check as the unit runs it, then its SIGHUP
        check, kill = done["unit_props"]["ExecReload"]
        checked = await _start(machine, done["unit_props"], shlex.split(check),
                               unit=f"{unit}-reload")
        code, out, err = await checked.finish(None)
        assert code == 0 and out.startswith("ok"), out + err
        assert kill == "/bin/kill -HUP $MAINPID"
        assert started.proc is not None
        started.proc.send_signal(signal.SIGHUP)

        def reloaded(ms: list[str]) -> bool:
            starts = [i for i, m in enumerate(ms) if m.startswith("RELOADING=1\nMONOTONIC_USEC=")]
            return bool(starts) and "READY=1" in ms[starts[-1]:]

        await started.until(reloaded)
    finally:
        code, out, err = await started.finish()
    assert code == 0, err
    assert out == "" and PASSWORD not in err
    assert any(m.startswith("STATUS=connected to ") for m in started.messages)


async def test_try_it_as_yourself_after_one_edit(sim: Simulator, machine: Path) -> None:
    """README's foreground try, as a user without privileges: its copy of the example, then the
    one edit ([server]), the password in the environment: check --connect logs in, run writes
    the events under ~/cometstream, Ctrl-C exits 0."""
    block = next(b for b in _blocks((ROOT / "README.md").read_text())
                 if "cometstream run -c" in b and "sudo" not in b)
    home = machine / "home/op"
    checkout = home / "cometstream-checkout"
    checkout.mkdir(parents=True)
    shutil.copy(ROOT / "config.example.toml", checkout)
    for d in (home, checkout, checkout / "config.example.toml"):
        os.chown(d, DYNAMIC_UID, DYNAMIC_UID)
    as_user = {"UMask": ["0022"], "DynamicUser": ["yes"]}
    http_port = _free_port()
    conf: Path | None = None
    env = {"HOME": str(home)}
    started: Started | None = None
    for line in _lines(block):
        words = shlex.split(line, comments=True)
        if words[0] == "sed":  # as the user, in the checkout
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(SANDBOX), json.dumps(_sandbox(as_user)), "--", "/bin/bash",
                "-c", line, env={**env, "PATH": "/usr/bin:/bin"}, cwd=checkout)
            assert await proc.wait() == 0
            conf = checkout / words[-1]
        elif words[0] == "$EDITOR":
            assert conf is not None
            text = conf.read_text()
            conf.write_text(text.replace(EXAMPLE_URL, f'url = "{sim.url}"')
                            .replace(EXAMPLE_USER, f"username = {toml_str(USER)}")
                            .replace('listen = "127.0.0.1:9780"',
                                     f'listen = "127.0.0.1:{http_port}"'))  # (the machine's)
        elif words[0] == "read":
            env["COMETSTREAM_PASSWORD"] = PASSWORD
        elif words[:2] == ["cometstream", "check"]:
            s = await _start_as_user(as_user, words, env, checkout)
            code, out, err = await s.finish(None)
            assert code == 0, out + err
            assert out.startswith("ok: logged in"), out
        elif words[:2] == ["cometstream", "run"]:
            started = await _start_as_user(as_user, words, env, checkout)
        else:
            raise AssertionError(f"a documented step this test does not know: {line}")
    assert started is not None
    events = home / "cometstream" / "events.jsonl"
    try:
        await sim.wait_for_clients(1, timeout=20)
        sim.emit_many(300)
        await wait_until(lambda: events.exists() and events.stat().st_size > 0, timeout=20,
                         what=f"events in {events}")
        assert events.stat().st_uid == DYNAMIC_UID
    finally:
        code, _out, err = await started.finish(signal.SIGINT)
    assert code == 0, err


async def _start_as_user(props: dict[str, list[str]], words: list[str], env: dict[str, str],
                         cwd: Path) -> Started:
    python, pythonpath = _interpreter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SANDBOX), json.dumps(_sandbox(props)), "--", python, "-m",
        *words, env={**env, "PATH": "/usr/bin:/bin", "PYTHONPATH": pythonpath}, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    return Started(proc)


async def test_a_config_the_unit_cannot_read_says_how_to_fix_it(machine: Path) -> None:
    """The folder made as the earlier docs made it (0750, root's): the unit's first start
    fails, exit 2, with one line naming the folder and the chmod that fixes it."""
    etc = machine / "etc/cometstream"
    etc.mkdir(mode=0o750)
    etc.chmod(0o750)
    shutil.copy(ROOT / "config.example.toml", etc / "config.toml")
    props = _unit_props((ROOT / "systemd/cometstream.service").read_text())
    props.pop("LoadCredentialEncrypted")
    started = await _start(machine, props, shlex.split(props["ExecStart"][-1]),
                           unit="cometstream.service")
    code, _out, err = await started.finish(None)
    assert code == 2
    assert err == (f"cometstream: config: {etc}/config.toml: permission denied for uid "
                   f"{DYNAMIC_UID}: {etc} is mode 0750, root:root; the units' dynamic user must "
                   f"be able to read it as \"others\": chmod 0755 {etc} (keep secrets out of it: "
                   "they are credentials)\n")


async def test_check_says_what_run_would_do_with_a_sink_it_cannot_write(machine: Path) -> None:
    """A file sink in a folder the user may not write: check (as that user) exits 2 saying what
    to do, and why run would not stop for it."""
    etc = machine / "etc/cometstream"
    etc.mkdir(mode=0o755)
    out_dir = machine / "srv"
    out_dir.mkdir(mode=0o755)
    state = machine / "var/lib/cometstream"
    state.mkdir()
    os.chown(state, DYNAMIC_UID, DYNAMIC_UID)
    conf = write_config(etc, "http://127.0.0.1:9/",
                        f'[sinks.archive]\ntype = "file"\npath = "{out_dir}/events.jsonl"\n')
    conf.write_text(conf.read_text().replace(str(etc / "state"), str(state)))
    os.chown(conf, DYNAMIC_UID, DYNAMIC_UID)  # (it holds the password: the user's own, 0600)
    conf.chmod(0o600)
    started = await _start(machine, {"DynamicUser": ["yes"]},
                           [INSTALLED, "check", "-c", "/etc/cometstream/c.toml"], unit="x")
    code, _out, err = await started.finish(None)
    assert code == 2
    assert err == (f"cometstream: config: sinks.archive.path: cannot create "
                   f"{out_dir}/events.jsonl: {out_dir} is not writable by uid {DYNAMIC_UID}: "
                   "give the user cometstream runs as write access, or choose another path; "
                   "run would start anyway and keep this sink's events in the ledger, with "
                   "/readyz 503, until it can write\n")


# --- check vouches for production ----------------------------------------------------------------
def _example(tmp_path: Path, url: str = "http://127.0.0.1:9/") -> Path:
    """config.example.toml with the one edit, its folders moved under tmp_path."""
    text = (ROOT / "config.example.toml").read_text()
    text = text.replace(EXAMPLE_URL, f'url = "{url}"').replace("/var/lib/cometstream",
                                                                str(tmp_path / "state"))
    text = text.replace('listen = "127.0.0.1:9780"', f'listen = "127.0.0.1:{_free_port()}"')
    conf = tmp_path / "config.toml"
    conf.write_text(text)
    return conf


def test_check_vouches_for_a_config_whose_password_is_the_units_credential(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped config, no password anywhere here: check passes and says that run takes the
    units' credential; check --connect, which needs it, says where the way to give it is."""
    for var in ("COMETSTREAM_PASSWORD", "CREDENTIALS_DIRECTORY", "SUDO_USER"):
        monkeypatch.delenv(var, raising=False)
    conf = _example(tmp_path)
    assert main(["check", "-c", str(conf)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "ok",
        ('note: server.password: set nowhere here; run takes it from the systemd credential '
         '"password" the units load: to log in with it, run check --connect as the unit runs '
         "(docs/operations.md)")]
    monkeypatch.setenv("SUDO_USER", "op")
    assert main(["check", "-c", str(conf), "--connect"]) == 2
    err = capsys.readouterr().err
    assert err == ("cometstream: config: server.password: required for auth_type Password, and "
                   "set nowhere here: COMETSTREAM_PASSWORD, password, password_file, or a systemd "
                   "credential 'password' (what the units load; check --connect with it: "
                   "docs/operations.md) (sudo does not pass COMETSTREAM_PASSWORD on: "
                   "sudo --preserve-env=COMETSTREAM_PASSWORD)\n")


def test_check_binds_the_http_port(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A port another program holds is a problem for check (exit 2), as it is for run."""
    monkeypatch.setenv("COMETSTREAM_PASSWORD", "not the password")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        conf = write_config(tmp_path, "http://127.0.0.1:9/", '[sinks.out]\ntype = "stdout"\n')
        conf.write_text(conf.read_text().replace('listen = ""', f'listen = "127.0.0.1:{port}"'))
        conf.chmod(0o600)
        assert main(["check", "-c", str(conf)]) == 2
    assert capsys.readouterr().err == (
        f"cometstream: config: http.listen: cannot listen on 127.0.0.1:{port}: Address already "
        f"in use: another program listens there (ss -ltnp 'sport = :{port}' names it); stop it "
        "or choose another port\n")
    assert main(["check", "-c", str(conf)]) == 0  # (let go: free again)


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_check_refuses_a_file_sink_path_that_run_would_not_write(
        kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A file sink's path that is a symbolic link (to a writable file) or a FIFO: check exits 2
    with run's own reason, as the sink would refuse it at open."""
    monkeypatch.setenv("COMETSTREAM_PASSWORD", "not the password")
    path = tmp_path / "events.jsonl"
    if kind == "symlink":
        (tmp_path / "elsewhere.jsonl").write_bytes(b"")
        path.symlink_to(tmp_path / "elsewhere.jsonl")
        why = "is a symbolic link (not followed)"
    else:
        os.mkfifo(path)
        why = "is not a regular file"
    conf = write_config(tmp_path, "http://127.0.0.1:9/",
                        f'[sinks.out]\ntype = "file"\npath = "{path}"\n')
    conf.chmod(0o600)
    assert main(["check", "-c", str(conf)]) == 2
    assert capsys.readouterr().err == (
        f"cometstream: config: sinks.out.path: {path} {why}; run would start anyway and keep "
        "this sink's events in the ledger, with /readyz 503, until the path is fixed\n")
    path.unlink()
    assert main(["check", "-c", str(conf)]) == 0  # (a missing file is created)


async def test_check_beside_the_running_daemon_notes_its_port(sim: Simulator,
                                                              tmp_path: Path) -> None:
    """While the daemon runs on the same state.dir with that port, check is ok and says so."""
    port = _free_port()
    cfg = make_config(sim.url, tmp_path, http={"listen": f"127.0.0.1:{port}"})
    async with running(cfg) as d:
        await wait_until(lambda: d.daemon.http is not None, what="the http endpoints")
        conf = write_config(tmp_path, sim.url, '[sinks.mem]\ntype = "memory"\n')
        conf.write_text(conf.read_text().replace('listen = ""', f'listen = "127.0.0.1:{port}"'))
        conf.chmod(0o600)
        proc = await run_cli("check", "-c", str(conf))
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines() == [
        "ok", (f"note: http.listen: 127.0.0.1:{port} is in use by the daemon running on this "
               f"state.dir (pid {os.getpid()})")]


def _check_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str], server: str,
                 sinks: str = '[sinks.out]\ntype = "stdout"\n', *,
                 command: tuple[str, ...] = ("check",)) -> list[str]:
    conf = tmp_path / "c.toml"
    conf.write_text(f'[server]\nurl = "http://127.0.0.1:9/"\n{server}\n[http]\nlisten = ""\n'
                    f'[state]\ndir = "{tmp_path / "state"}"\n{sinks}')
    conf.chmod(0o600)
    assert main([*command, "-c", str(conf)]) == 2
    return capsys.readouterr().err.splitlines()


def test_a_misspelt_required_key_is_reported_with_every_other_problem(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``usrname`` for ``username``: one line for it ("did you mean"), and the table's other
    problems too; a ``typ`` in a sink the same. A key that is real (``types``) is not taken for
    the missing one."""
    assert _check_lines(tmp_path, capsys, 'usrname = "x"\npassword = "p"\nauth_type = "Pasword"',
                        '[sinks.f]\ntyp = "file"\npath = "x.jsonl"\nfsync = "sometimes"\n'
                        '[sinks.out]\ntypes = ["SEVT_JOB_COMPLETED"]\n') == [
        'cometstream: config: server.usrname: unknown key (did you mean "username"?)',
        ('cometstream: config: server.auth_type: expected one of Password, PasswordTOTP, '
         'SessionKey, got "Pasword" (did you mean "Password"?)'),
        'cometstream: config: sinks.f.typ: unknown key (did you mean "type"?)',
        ('cometstream: config: sinks.f.fsync: expected one of always, batch, never, got '
         '"sometimes"'),
        "cometstream: config: sinks.out.type: is required"]


@pytest.mark.parametrize("command", [("check",), ("check", "--connect"), ("run",)])
def test_a_missing_password_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             command: tuple[str, ...]) -> None:
    """A password_file that is not there: one line, not a second one asking for a password."""
    assert _check_lines(tmp_path, capsys, f'username = "u"\npassword_file = "{tmp_path}/nope"',
                        command=command) == [
        f"cometstream: config: server.password_file: file not found: {tmp_path}/nope"]


@pytest.mark.parametrize("source", ["env", "inline", "file", "credential"])
def test_an_empty_secret_is_refused_naming_its_source(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        source: str) -> None:
    """An empty password is an error from every source, naming it (an empty variable does not
    hide the credential loaded after it)."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "password").write_text("" if source == "credential" else "from the unit")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.delenv("COMETSTREAM_PASSWORD", raising=False)
    (tmp_path / "secret.txt").write_text("\n")
    server = {"env": "", "inline": 'password = ""',
              "file": f'password_file = "{tmp_path}/secret.txt"', "credential": ""}[source]
    if source == "env":
        monkeypatch.setenv("COMETSTREAM_PASSWORD", "")
    lines = _check_lines(tmp_path, capsys, f'username = "u"\n{server}')
    assert lines == ["cometstream: config: " + {
        "env": "server.password: the environment variable COMETSTREAM_PASSWORD is set but "
               "empty: it comes before every other source; unset COMETSTREAM_PASSWORD, or put "
               "the password in it",
        "inline": "server.password: empty: put the password in it, or remove the line to use "
                  "the next source",
        "file": f"server.password_file: {tmp_path}/secret.txt is empty: put the password in it",
        "credential": f'server.password: the systemd credential "password" ({creds}/password) '
                      "is empty: encrypt the password into it again (docs/operations.md)",
    }[source]]


@pytest.mark.parametrize("source", ["env", "credential"])
async def test_a_rejected_login_names_where_the_password_came_from(
        sim: Simulator, tmp_path: Path, source: str) -> None:
    """403: the line says which source gave the password (the variable that came before the
    credential, or the credential), never its value."""
    conf = write_config(tmp_path, sim.url, '[sinks.out]\ntype = "stdout"\n')
    conf.write_text(conf.read_text().replace(f"password = {toml_str(PASSWORD)}\n", ""))
    conf.chmod(0o600)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "password").write_text("wrong from the unit" if source == "credential" else PASSWORD)
    env = cli_env(CREDENTIALS_DIRECTORY=str(creds))
    if source == "env":
        env["COMETSTREAM_PASSWORD"] = "wrong from the shell"
    proc = await run_cli("run", "-c", str(conf), env=env)
    _out, err_b = await asyncio.wait_for(proc.communicate(), 30)
    err = err_b.decode()
    assert proc.returncode == 3, err
    where = {"env": "the environment variable COMETSTREAM_PASSWORD (before the systemd "
                    'credential "password", also loaded)',
             "credential": f'the systemd credential "password" ({creds}/password)'}[source]
    assert err.splitlines()[-1] == (f"cometstream: login rejected by 127.0.0.1 for user "
                                    f"'{USER}' (Password, password from {where}): check them")
    assert "wrong from" not in err


# --- the units -----------------------------------------------------------------------------------
@pytest.mark.parametrize("unit", ["cometstream.service", "cometstream@.service"])
def test_the_units_name_their_own_credential_and_rate_at_most_1_2(tmp_path: Path,
                                                                   unit: str) -> None:
    """The header's command encrypts the file the unit loads; systemd-analyze verify is clean
    and security --offline rates the unit 1.2 or better."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    text = (ROOT / "systemd" / unit).read_text()
    loaded = re.findall(r"^LoadCredentialEncrypted=password:(\S+)$", text, re.MULTILINE)
    told = re.findall(r"^#.*systemd-creds encrypt --name=password - (\S+?);?(?:\s|$)",
                      text, re.MULTILINE)
    assert loaded and told == loaded, (told, loaded)
    target = tmp_path / unit.replace("@.", "@comet1.")
    target.write_text(text.replace(f"={INSTALLED} ", "=/usr/bin/true "))  # (Start, Reload)
    verify = subprocess.run(["systemd-analyze", "verify", str(target)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    sec = subprocess.run(["systemd-analyze", "security", "--offline=true", str(target)],
                         capture_output=True, text=True, timeout=60, check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", sec.stdout + sec.stderr)
    assert m, sec.stdout + sec.stderr
    assert float(m.group(1)) <= 1.2, sec.stdout


async def test_a_second_signal_stops_the_drain_at_once(sim: Simulator, tmp_path: Path) -> None:
    """SIGINT, then SIGINT again while a webhook that never answers holds the drain (with a
    shutdown.timeout of an hour): the daemon says so, exits 0, and the events the sink has not
    got stay in the ledger."""
    requests = asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        requests.set()
        await reader.read()  # (until the daemon goes)
        writer.close()

    hook = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = hook.sockets[0].getsockname()[1]
    conf = write_config(tmp_path, sim.url, f"""
[shutdown]
timeout = 3600
[sinks.hook]
type = "webhook"
url = "http://127.0.0.1:{port}/"
timeout = 600
""")
    conf.chmod(0o600)
    proc = await run_cli("run", "-c", str(conf))
    lines: list[str] = []

    async def read_err() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            lines.append(line.decode())

    reader = asyncio.create_task(read_err())
    try:
        await wait_until(lambda: sim.clients >= 1, timeout=20, what="the daemon logged in")
        await wait_until(lambda: any('"resync done"' in ln for ln in lines), timeout=20,
                         what="the first sync")
        sim.emit_many(100)
        async with asyncio.timeout(20):
            await requests.wait()
        proc.send_signal(signal.SIGINT)
        await wait_until(lambda: any('"stopping"' in ln for ln in lines), timeout=20,
                         what="stopping")
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 60)  # (a guard: the drain would wait an hour)
        await reader
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        hook.close()
    assert proc.returncode == 0, "".join(lines)
    said = [json.loads(ln) for ln in lines if ln.startswith("{")]
    assert any(d["event"] == "second signal: stopping now, without waiting for the sinks"
               and d["undelivered"] == "stays in the ledger for the next start" for d in said)
    kept = [d for d in said if d["event"] == "events stay in the ledger for the next start"]
    assert kept and kept[0]["sink"] == "hook" and kept[0]["events"] > 0, said
    db = sqlite3.connect(f"file:{tmp_path / 'state' / 'ledger.db'}?mode=ro", uri=True)
    try:
        (cursor,) = db.execute("SELECT seq FROM cursors WHERE sink = 'hook'").fetchone()
        (last,) = db.execute("SELECT max(last_seq) FROM chunks").fetchone()
    finally:
        db.close()
    assert last > cursor


async def test_the_documented_dedup_query_counts_keys(sim: Simulator, tmp_path: Path) -> None:
    """docs/operations.md's query of the dedup window gives the number of keys the next start
    loads (not the number of commits)."""
    query = re.search(r"sqlite3 -readonly \$L '(SELECT [^']*FROM dedup)'",
                      (ROOT / "docs" / "operations.md").read_text())
    assert query is not None
    cfg = make_config(sim.url, tmp_path, spool={"fsync_interval": 0.01})
    async with running(cfg) as d:
        await wait_until(lambda: d.daemon.resyncs_ok >= 1, timeout=10, what="the first sync")
        for _ in range(3):  # (in several commits)
            sim.emit_many(200)
            await wait_until(lambda: d.daemon.ledger.durable_seq >= d.daemon.pipeline.seq,
                             what="the events committed")
        await d.stopped()  # a clean stop: it raises otherwise
    db = sqlite3.connect(f"file:{tmp_path / 'state' / 'ledger.db'}?mode=ro", uri=True)
    try:
        (documented,) = db.execute(query.group(1)).fetchone()
        (rows,) = db.execute("SELECT count(*) FROM dedup").fetchone()
    finally:
        db.close()
    from cometstream.daemon import Daemon

    again = Daemon(cfg)  # what the next start loads (its "ledger loaded" line's dedup=)
    again._load_state()
    loaded = len(again.tracker.dedup)
    await again.ledger.close()
    again.lock.release()
    assert loaded > rows
    assert documented == loaded


# --- messages ------------------------------------------------------------------------------------
async def test_https_against_a_plain_http_port_says_to_use_http(sim: Simulator,
                                                                tmp_path: Path) -> None:
    """The stream and the admin API both say that the server answered in plain HTTP."""
    from cometstream.api import AdminClient
    from cometstream.errors import ApiError
    from cometstream.stream import make_ssl_context

    https = sim.url.replace("http://", "https://")
    conf = write_config(tmp_path, https, '[sinks.out]\ntype = "stdout"\n')
    conf.chmod(0o600)
    proc = await run_cli("check", "-c", str(conf), "--connect")
    _out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    hint = ("the server answered in plain HTTP, not TLS: use http:// in server.url for this "
            "port, or the port where it serves https")
    assert err.decode().startswith("cometstream: stream: TLS failed: ")
    assert err.decode().endswith(f": {hint}\n"), err.decode()
    cfg = make_config(https, tmp_path)
    async with AdminClient(cfg.server, ssl_context=make_ssl_context(cfg.server),
                           connect_timeout=5, attempts=1) as api:
        with pytest.raises(ApiError) as info:
            await api.meta_version()
    assert str(info.value).endswith(f": {hint}")


def test_since_says_unix_seconds_are_accepted(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """--since's error names every form it takes."""
    conf = write_config(tmp_path, "http://127.0.0.1:9/", '[sinks.out]\ntype = "stdout"\n')
    conf.chmod(0o600)
    assert main(["backfill", "-c", str(conf), "--since", "last week"]) == 2
    assert capsys.readouterr().err == (
        "cometstream: --since: expected a date like 2026-11-01 or 2026-11-01T12:30, or Unix "
        'seconds like 1733400000, got "last week"\n')
