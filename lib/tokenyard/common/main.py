"""The ``main()`` every service shares: flags and env → settings → logging → serve → exit code."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from tokenyard.common.cli_settings import parse_settings
from tokenyard.common.logs import configure_logging
from tokenyard.common.service import StartupError
from tokenyard.common.settings import ServiceSettings
from tokenyard.common.tracing import service_name, setup_tracing, shutdown_tracing

S = TypeVar("S", bound=ServiceSettings)

Preload = Callable[[], None]
"""What a respawning template imports before it forks the service (:mod:`tokenyard.deploy.respawn`)."""


def run_service(
    settings_cls: type[S],
    serve: Callable[[S], Coroutine[Any, Any, None]],
    argv: Sequence[str] | None,
    *,
    description: str,
    respawn: Callable[[S], Preload | None] | None = None,
) -> int:
    """Parse settings, configure logging and tracing, serve until SIGTERM; returns the exit code.

    ``respawn``: for a service that can run from a template process, what the template preloads
    when the settings ask for it (None: serve in this process)."""
    prog = f"tokenyard {settings_cls.service_name}"
    settings, _ = parse_settings(settings_cls, argv, prog, description)
    configure_logging(
        settings.log_level.value, settings.log_format.value, service_name(settings_cls.service_name)
    )
    preload = respawn(settings) if respawn is not None else None
    if preload is None:
        return _serve(settings_cls, serve, settings, prog, startup_error=1)

    from tokenyard.deploy.respawn import EXIT_STARTUP, run_template

    def preload_or_explain() -> None:
        try:
            preload()
        except StartupError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None

    return run_template(
        prog,
        lambda: _serve(settings_cls, serve, settings, prog, startup_error=EXIT_STARTUP),
        preload_or_explain,
    )


def _serve(
    settings_cls: type[S],
    serve: Callable[[S], Coroutine[Any, Any, None]],
    settings: S,
    prog: str,
    *,
    startup_error: int,
) -> int:
    # Tracing starts an exporter thread: in the process that serves, never in a template.
    setup_tracing(settings_cls.service_name)
    try:
        asyncio.run(serve(settings))
    except StartupError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return startup_error
    except KeyboardInterrupt:
        # A second Ctrl-C during shutdown: the first already asked for a graceful stop.
        return 130
    finally:
        shutdown_tracing()
    return 0
