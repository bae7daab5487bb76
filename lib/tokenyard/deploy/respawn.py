"""Respawning a service from a template process (``tokenyard worker --respawn``).

A worker that crashes and is started again by its supervisor (``tokenyard up``, Kubernetes) pays
for the interpreter, the imports (PyTorch alone takes a second or more on two cores) and its
settings again before it even begins on its weights. With ``--respawn`` the process started is a
template instead: it parses the settings, imports what the service will import (``preload``) and
forks the service, once at start and again each time it dies, the way a pre-forking web server
replaces a worker. A respawned worker starts at its engine's load; with its weights in the gms
that is a few hundredths of a second.

The template runs no event loop, opens no connection and starts no thread of its own, so the fork
copies nothing half done. (PyTorch starts one native helper thread at import; it re-creates its
pools in a forked child, which its data loaders rely on.)

Restarts follow ``tokenyard up``'s policy (:class:`RestartPolicy`), except that the first crash
is replaced at once; a crash loop ends the template with the last exit status. A service that
fails its startup checks (bad settings, a missing model) on its first start is not respawned: it
would fail the same way again.

Signals: SIGTERM or SIGINT to the template becomes SIGTERM to the service; the template waits for
its graceful shutdown (drain, deregister) and exits with its status; a second signal kills the
service at once. The service runs in a process group of its own, so a Ctrl-C in a terminal reaches
it once, through the template. If the template is killed outright, the kernel sends the service
SIGTERM (``PR_SET_PDEATHSIG``), as ``tokenyard up`` arranges for its own children.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from types import FrameType

from tokenyard.deploy.parent_watch import SUPERVISOR_PID_ENV, stop_with_supervisor
from tokenyard.deploy.supervisor import RestartPolicy, RestartTracker, describe_exit

log = logging.getLogger(__name__)

EXIT_STARTUP = 78
"""Exit status of a service that refused its settings or environment at startup (sysexits'
EX_CONFIG): the template does not respawn it when its first start ends so."""

DEFAULT_POLICY = RestartPolicy(first_at_once=True)


class _Signals:
    """SIGTERM and SIGINT, forwarded to the current service process."""

    def __init__(self) -> None:
        self.child = 0
        self.received = 0

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.received += 1
        if self.child:
            # The first asks for a graceful stop; any later one ends the service at once.
            forward = signal.SIGTERM if self.received == 1 else signal.SIGKILL
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, forward)


def run_template(
    name: str,
    run: Callable[[], int],
    preload: Callable[[], None],
    policy: RestartPolicy = DEFAULT_POLICY,
) -> int:
    """Preload, then run ``run`` in a forked process until it stops cleanly or the template is
    asked to stop; respawn it when it dies. Returns the exit status for the template."""
    started = time.perf_counter()
    try:
        preload()
    except Exception:
        # Preloading only saves time: the worker imports whatever it still needs when it starts.
        log.exception("%s: preloading failed; each worker imports what it needs when it starts", name)
    log.info("%s: template ready in %.2fs (imports preloaded)", name, time.perf_counter() - started)
    signals = _Signals()
    signals.install()
    tracker = RestartTracker(policy)
    first = True
    while not signals.received:
        pid = _spawn(run)
        signals.child = pid
        born = time.monotonic()
        if first:
            log.info("%s: service pid %d", name, pid)
        _, status = os.waitpid(pid, 0)
        signals.child = 0
        code = os.waitstatus_to_exitcode(status)
        if signals.received:
            return code if code >= 0 else 128 - code
        if code == 0:
            log.info("%s: service pid %d stopped by itself; the template stops too", name, pid)
            return 0
        if first and code == EXIT_STARTUP:
            return 1  # the service printed why; it would fail the same way again
        first = False
        delay = tracker.next_delay()
        lived = time.monotonic() - born
        if delay is None:
            p = tracker.policy
            log.error(
                "%s: service pid %d %s after %.1fs: %d restarts within %.0fs (--max-restarts policy), giving up",
                name, pid, describe_exit(code), lived, p.max_restarts, p.window,
            )  # fmt: skip
            return code if code > 0 else 1
        log.warning(
            "%s: service pid %d %s after %.1fs; respawning it%s (restart %d of at most %d within %.0fs)",
            name, pid, describe_exit(code), lived, f" in {delay:.1f}s" if delay else "",
            tracker.recent, tracker.policy.max_restarts, tracker.policy.window,
        )  # fmt: skip
        deadline = time.monotonic() + delay
        while not signals.received and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    return 0


def _spawn(run: Callable[[], int]) -> int:
    """Fork; in the child run the service and exit with its status, never returning."""
    template = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setpgid(0, 0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stop_with_supervisor({SUPERVISOR_PID_ENV: str(template)})
        code = run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
