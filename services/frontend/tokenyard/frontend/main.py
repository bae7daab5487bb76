"""Frontend: OpenAI HTTP and KServe v2 gRPC in, tokens from the workers the router picks out."""

from __future__ import annotations

from collections.abc import Sequence

from tokenyard.common.main import run_service
from tokenyard.frontend.config import FrontendSettings
from tokenyard.frontend.server import serve
from tokenyard.frontend.tokenizer.large import one_core_per_encode


def main(argv: Sequence[str] | None = None) -> int:
    # Before the service starts a thread: the environment is only safe to set while none runs.
    one_core_per_encode()
    return run_service(FrontendSettings, serve, argv, description=__doc__ or "")
