"""Children of ``tokenyard up`` stop when it dies, even by SIGKILL.

``up`` stops its children in order when it is asked to; killed outright it cannot, and its
children (each in a session of its own, so that Ctrl-C reaches only ``up``) would serve on as
orphans that no ``tokenyard down`` knows about. So ``up`` names itself in the children's
environment, and each child asks the kernel (Linux ``PR_SET_PDEATHSIG``) for SIGTERM when its
parent goes: the service then shuts down as on any SIGTERM, deregistering first. The request is
made by the child at startup rather than in a ``preexec_fn``, which is unsafe in a parent that
runs threads (gRPC's), as ``up`` does.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Mapping

# Set by the supervisor to its own pid in each child's environment.
SUPERVISOR_PID_ENV = "TOKENYARD_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


def child_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a supervised child: this process's, naming this process."""
    env = dict(os.environ if environ is None else environ)
    env[SUPERVISOR_PID_ENV] = str(os.getpid())
    return env


def stop_with_supervisor(environ: Mapping[str, str] | None = None) -> bool:
    """In a supervised child: get SIGTERM when the supervisor dies; True when armed.

    The variable is removed once read, so that processes this child starts in turn (a planner's
    workers) are not tied to a parent that is not theirs."""
    env = os.environ if environ is None else environ
    value = env.get(SUPERVISOR_PID_ENV)
    if environ is None:
        os.environ.pop(SUPERVISOR_PID_ENV, None)
    if not value or not sys.platform.startswith("linux"):
        return False
    try:
        supervisor = int(value)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (ValueError, OSError, AttributeError):
        return False
    # The supervisor may have died between starting this process and the request above, in
    # which case no signal will come: this process has been handed to another parent already.
    if os.getppid() != supervisor:
        os.kill(os.getpid(), signal.SIGTERM)
    return True
