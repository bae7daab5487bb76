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


def run_service(
    settings_cls: type[S],
    serve: Callable[[S], Coroutine[Any, Any, None]],
    argv: Sequence[str] | None,
    *,
    description: str,
) -> int:
    """Parse settings, configure logging and tracing, serve until SIGTERM; returns the exit code."""
    prog = f"tokenyard {settings_cls.service_name}"
    settings, _ = parse_settings(settings_cls, argv, prog, description)
    configure_logging(
        settings.log_level.value, settings.log_format.value, service_name(settings_cls.service_name)
    )
    setup_tracing(settings_cls.service_name)
    try:
        asyncio.run(serve(settings))
    except StartupError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # A second Ctrl-C during shutdown: the first already asked for a graceful stop.
        return 130
    finally:
        shutdown_tracing()
    return 0
