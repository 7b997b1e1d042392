#!/usr/bin/env python3
"""Mutation check: break the delivery core one line at a time and make sure a test notices.

Each mutation below names a file, an exact piece of its text, what to put instead, and the tests
that must fail once it is applied. For each selected mutation the script copies the source tree
to a temporary directory, applies the mutation there, runs the named tests in the copy (with
``PYTHONPATH`` pointing at the copy, so that the copy's code is what is imported, in test
subprocesses too) and reports:

- ``KILLED``: the tests failed, as they should;
- ``SURVIVED``: the tests passed against broken code: a promise that nothing checks;
- ``ERROR``: the tests could not run (collection error, timeout, missing file).

The working tree is only read. Before the mutations, the named tests are run once on an
unmutated copy (``--no-baseline`` skips it): a test that fails there proves nothing.

Usage (from the repository, with the project's virtualenv)::

    .venv/bin/python scripts/mutation_check.py              # every mutation
    .venv/bin/python scripts/mutation_check.py --list       # what there is
    .venv/bin/python scripts/mutation_check.py dedup-window-age file-recovery-position

Exit status: 0 every mutation killed; 1 one survived; 2 a mutation's old text is not found
exactly once in its file (the code moved: update the list), or an unknown name; 3 the tests
could not run (baseline failure, error, timeout).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    #: what the mutation breaks, in one line
    what: str
    #: the file, relative to the repository root
    file: str
    #: exact text, found exactly once in the file (a little context may make it unique); the
    #: mutation itself changes one line
    old: str
    new: str
    #: pytest node ids or files (relative to the root) of which at least one must fail
    tests: tuple[str, ...]


MUTATIONS: tuple[Mutation, ...] = (
    # --- ordering of concurrent sends
    Mutation(
        name="ordering-job-guid",
        what="job events without a ResourceID get no ordering key (a completion may overtake "
             "its start)",
        file="cometstream/events.py",
        old='                keys.append("j:" + guid)',
        new="                pass",
        tests=("tests/test_ordering.py",),
    ),
    # --- dedup
    Mutation(
        name="dedup-window-age",
        what="the dedup window is pruned by size only: keys never expire after 24 h",
        file="cometstream/delivery/window.py",
        old="            if excess > 0 or ts < horizon:",
        new="            if excess > 0:",
        tests=("tests/test_dedup_window.py",),
    ),
    Mutation(
        name="dedup-inflight",
        what="a job event published but not yet kept is not seen by the dedup window",
        file="cometstream/delivery/gate.py",
        old="        if fp in dedup.delivered or fp in dedup.inflight:",
        new="        if fp in dedup.delivered:",
        tests=(("tests/test_resync.py::"
                "test_a_repeated_job_event_is_delivered_once_but_identical_logins_twice"),),
    ),
    # --- file sink recovery
    Mutation(
        name="file-recovery-position",
        what="the file sink is handed no committed position at start: it writes again what "
             "it wrote after the last commit",
        file="cometstream/daemon.py",
        old="        self.pipeline.recover(self.ledger.positions)",
        new="        self.pipeline.recover({})",
        tests=("tests/test_file_recovery.py",),
    ),
    # --- ledger commit
    Mutation(
        name="ledger-cursor-cap",
        what="a sink's cursor is committed past what the commit keeps",
        file="cometstream/store/plan.py",
        old="    return {k: v if v <= through else through for k, v in cursors.items()}",
        new="    return dict(cursors)",
        tests=("tests/test_ledger.py::test_a_file_sinks_committed_position_waits_for_what_is_kept",),
    ),
    Mutation(
        name="ledger-loop-fails-waiters",
        what="a commit that fails on a bug leaves the read loop waiting for room for ever",
        file="cometstream/delivery/ledger.py",
        old="            self._wake_waiters(error)",
        new="            pass",
        tests=(("tests/test_ledger.py::"
                "test_an_unexpected_commit_failure_fails_the_waiters_and_is_logged_once"),),
    ),
    # --- cursors
    Mutation(
        name="cursor-resume",
        what="after a restart a sink behind in the spool resumes one event past its cursor",
        file="cometstream/pipeline/pipeline.py",
        old="                route.next_seq = cursor + 1",
        new="                route.next_seq = cursor + 2",
        tests=("tests/test_spool.py::test_a_restart_resumes_a_lagging_sink_from_its_cursor",),
    ),
    # --- backoff
    Mutation(
        name="backoff-reset-on-progress",
        what="a partly accepted batch does not reset the backoff",
        file="cometstream/pipeline/retry.py",
        old="                self.backoff.reset()  # the sink works: the next failure starts small "
            "again",
        new="                pass",
        tests=("tests/test_pipeline.py::test_progress_resets_the_backoff",),
    ),
    # --- the one retry policy, and a worker's death
    Mutation(
        name="retry-outage-counts",
        what="with several sends in flight, a receiver that refuses every POST (down) spends "
             "max_retries and dead-letters events",
        file="cometstream/pipeline/retry.py",
        old="            counts = route.accepted_sends != self._seen  # the receiver takes others, "
            "not this",
        new="            counts = True",
        tests=(("tests/test_webhook.py::"
                "test_a_receiver_refusing_every_post_dead_letters_nothing"),
               "tests/test_retry.py"),
    ),
    Mutation(
        name="worker-death-silent",
        what="a sink worker that dies is only logged: the sink not failing, producers left "
             "waiting",
        file="cometstream/pipeline/pipeline.py",
        old='                f"sink {route.name}", partial(self._worker_died, route))',
        new='                f"sink {route.name}", lambda _died: None)',
        tests=(("tests/test_pipeline.py::"
                "test_a_sink_worker_that_dies_is_logged_marked_failing_and_blocks_nobody"),
               ("tests/test_pipeline.py::"
                "test_an_ack_listener_that_raises_fails_the_sink_instead_of_hanging")),
    ),
    # --- redaction
    Mutation(
        name="redact-password-hash-safe",
        what="PasswordHash is taken for a flag, not a secret: account events carry it in clear",
        file="cometstream/redact.py",
        old='"HasPassword", "PasswordLastChanged",',
        new='"HasPassword", "PasswordLastChanged", "PasswordHash",',
        tests=(("tests/test_security_frames.py::"
                "test_a_password_hash_in_an_account_event_never_reaches_a_sink"),),
    ),
    Mutation(
        name="redact-totp-key",
        what="TOTPKey is no longer a secret key name: TOTP seeds reach the sinks",
        file="cometstream/redact.py",
        old='    r"password|passwd|passphrase|secret|totpkey|privatekey|',
        new='    r"password|passwd|passphrase|secret|privatekey|',
        tests=(("tests/test_resync.py::"
                "test_secrets_in_account_and_server_events_never_reach_a_sink"),),
    ),
    # --- documented promises of the ledger, security and the remedial sync
    Mutation(
        name='ledger-foreign',
        what='a ledger written for another server is used, not moved aside',
        file='cometstream/store/store.py',
        old='        if owner is not None and owner[0] != server:',
        new='        if owner is not None and owner[0] != owner[0]:',
        tests=('tests/test_ledger_promises.py::test_a_ledger_written_for_another_server_is_moved_aside_not_used',),
    ),
    Mutation(
        name='spool-max-age',
        what="the spool's max_age is ignored: old events stay for ever",
        file='cometstream/store/plan.py',
        old='        if size > max_bytes or newest < now - max_age:',
        new='        if size > max_bytes:',
        tests=('tests/test_ledger_promises.py::test_events_older_than_max_age_are_deleted_for_the_lagging_sink_only',),
    ),
    Mutation(
        name='file-shorter',
        what="a file sink's file shorter than at the last commit goes unreported",
        file='cometstream/sinks/file.py',
        old='        if found == 0 and self._size < offset:',
        new='        if found == 0 and self._size > offset:',
        tests=('tests/test_ledger_promises.py::test_a_file_shorter_than_at_the_last_commit_is_reported_and_written_on',),
    ),
    Mutation(
        name='backpressure-count',
        what='the read loop no longer waits once 6,144 events wait for the disk',
        file='cometstream/delivery/ledger.py',
        old='PENDING_MAX: Final = 6_144',
        new='PENDING_MAX: Final = 8_192',
        tests=('tests/test_ledger_promises.py::test_the_read_loop_waits_once_6144_events_wait_for_the_disk',),
    ),
    Mutation(
        name='kafka-sasl-mask',
        what='a Kafka SASL password is not registered for masking',
        file='cometstream/sinks/kafka.py',
        old='            register_secret(password)',
        new='            pass',
        tests=('tests/test_security_promises.py::test_a_kafka_password_a_broker_echoes_is_masked_in_the_log_and_readyz',),
    ),
    Mutation(
        name='sink-options-repr',
        what="a sink's options (its secrets) appear in the config's repr",
        file='cometstream/config.py',
        old='    options: Mapping[str, Any] = field(repr=False)',
        new='    options: Mapping[str, Any]',
        tests=('tests/test_security_promises.py::test_a_kafka_password_is_in_no_repr_of_the_config_or_the_sink',),
    ),
    Mutation(
        name='secret-file-mode',
        what='a secret file readable by its group is not warned about',
        file='cometstream/config.py',
        old='        if mode & 0o044:',
        new='        if mode & 0o004:',
        tests=('tests/test_security_promises.py::test_check_warns_about_a_sinks_secret_file_and_tls_key_others_can_read',),
    ),
    Mutation(
        name='state-dir-owner',
        what='a state.dir owned by another user is not warned about',
        file='cometstream/store/statedir.py',
        old='    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():',
        new='    if False:',
        tests=('tests/test_security_promises.py::test_run_warns_when_state_dir_belongs_to_another_user',),
    ),
    Mutation(
        name='warning-rate-limit',
        what='repeated malformed-frame warnings are not rate limited',
        file='cometstream/stream.py',
        old='        if last is not None and now - last < self.interval:',
        new='        if False:',
        tests=('tests/test_security_promises.py::test_malformed_frames_log_one_warning_a_minute_per_reason',),
    ),
    Mutation(
        name='type-cap',
        what='the per-type event counts grow without bound',
        file='cometstream/stream.py',
        old='_TYPES_COUNTED: Final = 1024',
        new='_TYPES_COUNTED: Final = 1 << 20',
        tests=('tests/test_security_promises.py::test_the_per_type_event_counts_keep_at_most_1024_types',),
    ),
    Mutation(
        name='ledger-transaction-bound',
        what='a ledger transaction may hold 64 MiB',
        file='cometstream/store/plan.py',
        old='COMMIT_MAX_BYTES: Final = 32 * 1024 * 1024',
        new='COMMIT_MAX_BYTES: Final = 64 * 1024 * 1024',
        tests=('tests/test_security_promises.py::test_a_ledger_transaction_holds_32_mib_of_events_at_most',),
    ),
    Mutation(
        name='unready-after-seconds',
        what='/readyz ignores unready_after_seconds',
        file='cometstream/health.py',
        old='            if n >= rs.unready_after_failures or failing >= rs.unready_after_seconds:',
        new='            if n >= rs.unready_after_failures:',
        tests=('tests/test_security_promises.py::test_readyz_turns_503_once_syncs_have_failed_for_unready_after_seconds',),
    ),
    Mutation(
        name='resync-span-growth',
        what='a span of the job window never grows back after a dense stretch',
        file='cometstream/resync.py',
        old='    grown = span * SPAN_GROWTH',
        new='    grown = span',
        tests=('tests/test_resync_spans.py::test_spans_grow_back_after_a_dense_stretch',),
    ),
    Mutation(
        name='resync-span-limit',
        what="a span's answer far past the target is read whole",
        file='cometstream/resync.py',
        old='        limit = self.span_bytes * SPAN_GROWTH if stop - start > MIN_CHUNK else None',
        new='        limit = None',
        tests=('tests/test_resync_spans.py::test_spans_grow_back_after_a_dense_stretch',),
    ),
    Mutation(
        name='refused-answer-freed',
        what="a refused answer's bytes stay alive with its exception",
        file='cometstream/api.py',
        old='            body.clear()',
        new='            pass',
        tests=('tests/test_resync_spans.py::test_a_refused_answer_is_freed_at_once',),
    ),
)


# --- the tree -------------------------------------------------------------------------------------
_SKIP_TOP = {".git", ".venv", "venv", "build", "dist"}
_SKIP_ANY = {"__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}


def _ignore(root: Path) -> Callable[[str, list[str]], set[str]]:
    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder).resolve() == root
        return {n for n in names if n in _SKIP_ANY or n.endswith(".egg-info")
                or (top and n in _SKIP_TOP)}
    return ignore


def copy_tree(dest: Path) -> Path:
    """A copy of the repository (no VCS data, virtualenv or caches) at ``dest/tree``."""
    tree = dest / "tree"
    shutil.copytree(ROOT, tree, ignore=_ignore(ROOT), symlinks=True)
    return tree


def locate(m: Mutation, root: Path = ROOT) -> str | None:
    """None if ``m.old`` is found exactly once in its file under ``root``, else why not."""
    path = root / m.file
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return f"{m.file}: {exc.strerror or exc}"
    n = text.count(m.old)
    if n != 1:
        return f"{m.file}: the old text is found {n} times, not once"
    return None


def apply(m: Mutation, tree: Path) -> None:
    path = tree / m.file
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace(m.old, m.new, 1), encoding="utf-8")


# --- running the tests ----------------------------------------------------------------------------
@dataclass
class Outcome:
    status: str  # KILLED, SURVIVED, ERROR
    seconds: float
    output: str


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tree), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def run_tests(python: str, tree: Path, tests: Sequence[str], timeout: float) -> Outcome:
    """Run ``tests`` in ``tree``: KILLED if a test failed, SURVIVED if all passed."""
    env = _env(tree)
    t0 = time.monotonic()
    probe = subprocess.run([python, "-c", "import cometstream; print(cometstream.__file__)"],
                           cwd=tree, env=env, capture_output=True, text=True, timeout=60,
                           check=False)
    imported = probe.stdout.strip()
    if probe.returncode != 0 or not Path(imported).resolve().is_relative_to(tree.resolve()):
        return Outcome("ERROR", 0.0, f"the copy's code is not what is imported: {imported!r} "
                       f"{probe.stderr.strip()}")
    missing = [t for t in tests if not (tree / t.split("::")[0]).exists()]
    if missing:
        return Outcome("ERROR", 0.0, f"no such test file: {', '.join(missing)}")
    cmd = [python, "-m", "pytest", "-q", "-x", "--basetemp", str(tree.parent / "pytest"),
           *tests]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else ""
        return Outcome("ERROR", time.monotonic() - t0, f"timed out after {timeout:g} s\n{out}")
    took = time.monotonic() - t0
    output = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return Outcome("SURVIVED", took, output)
    if proc.returncode == 1:  # tests ran, some failed
        return Outcome("KILLED", took, output)
    return Outcome("ERROR", took, f"pytest exited {proc.returncode}\n{output}")


def _tail(text: str, n: int = 25) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-n:])


def _summary(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1].strip("= ") if lines else ""


# --- main -----------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Apply each one-line mutation to a copy of the tree and check that the "
                    "named tests fail.")
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the run of the named tests on an unmutated copy")
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="seconds for one mutation's tests (default 900)")
    ap.add_argument("--python", default=sys.executable,
                    help="the interpreter that runs pytest (default: this one)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="show the end of the test output of every run")
    args = ap.parse_args(argv)

    known = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        print(f"unknown mutation(s): {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    selected = [known[n] for n in args.names] if args.names else list(MUTATIONS)

    if args.list:
        for m in selected:
            where = locate(m)
            print(f"{m.name}{'  [STALE: ' + where + ']' if where else ''}\n"
                  f"    {m.what}\n    {m.file}: {m.old.strip()!r} -> {m.new.strip()!r}\n"
                  f"    caught by: {' '.join(m.tests)}")
        return 0

    stale = [(m, why) for m in selected if (why := locate(m)) is not None]
    if stale:
        for m, why in stale:
            print(f"STALE     {m.name}: {why}")
        print("the code moved: update the mutation's old text in scripts/mutation_check.py")
        return 2

    work = Path(tempfile.mkdtemp(prefix="cometstream-mutation-"))
    try:
        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in selected for t in m.tests))
            base = copy_tree(work / "baseline")
            out = run_tests(args.python, base, tests, args.timeout)
            if out.status != "SURVIVED":  # (here: passed, as it must)
                print(f"BASELINE  the named tests do not pass on the unmutated tree "
                      f"({out.status.lower()}):\n{_tail(out.output)}")
                return 3
            print(f"baseline  {len(tests)} test path(s) pass unmutated ({out.seconds:.1f} s)")
            if not args.keep:
                shutil.rmtree(work / "baseline", ignore_errors=True)
        results: dict[str, int] = {"KILLED": 0, "SURVIVED": 0, "ERROR": 0}
        for m in selected:
            tree = copy_tree(work / m.name)
            apply(m, tree)
            out = run_tests(args.python, tree, m.tests, args.timeout)
            results[out.status] += 1
            print(f"{out.status:<9} {m.name} ({out.seconds:.1f} s): {_summary(out.output)}",
                  flush=True)
            if out.status != "KILLED":
                print(f"    {m.what}\n    tests: {' '.join(m.tests)}")
            if (out.status == "ERROR" and "\n" in out.output.strip()) or args.verbose:
                print(_tail(out.output))
            if not args.keep:
                shutil.rmtree(work / m.name, ignore_errors=True)
        print(f"{results['KILLED']} killed, {results['SURVIVED']} survived, "
              f"{results['ERROR']} error(s)")
    finally:
        if args.keep:
            print(f"copies kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if results["SURVIVED"]:
        return 1
    return 3 if results["ERROR"] else 0


if __name__ == "__main__":
    sys.exit(main())
