"""Run the app under uvicorn with a graceful drain on SIGTERM / SIGINT.

uvicorn's own shutdown closes the listening socket first, so a client arriving during the
drain sees "connection refused" instead of an answer. Here the first signal only switches
the app to draining: new requests get 503 (and /health 503, so a load balancer stops
routing), in-flight requests run to completion for up to --shutdown-timeout seconds, the
rest are aborted, and then uvicorn shuts down as usual. A second SIGINT exits at once;
a repeated SIGTERM is ignored.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from engram_runtime.engine_config import EngineConfig

from server.app import create_app
from server.config import ServerConfig
from server.engine_client import EngineClient

logger = logging.getLogger("engram_serve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, client: EngineClient, shutdown_timeout: float):
        super().__init__(config)
        self._client = client
        self._shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self.exit_code = 0

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        # Runs in the signal handler: only schedule work on the loop.
        if self._loop is None:
            self.should_exit = True
            return
        if self._draining:  # like uvicorn: a second Ctrl-C skips the rest; a repeated SIGTERM changes nothing
            if sig == signal.SIGINT:
                self.force_exit = self.should_exit = True
            return
        self._draining = True
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        await self._client.drain(self._shutdown_timeout)
        self.should_exit = True

    def fail(self, exc: BaseException) -> None:
        """The engine could not load: nothing to serve, so stop with an error code."""
        self.exit_code = 1
        self.should_exit = True


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    """Blocks until the server has stopped; returns the process exit code."""
    app = create_app(engine_config, server_config)
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port,
                            log_level=server_config.log_level, timeout_graceful_shutdown=5,
                            access_log=server_config.log_level == "debug")
    server = DrainingServer(config, app.state.client, server_config.shutdown_timeout)
    app.state.on_load_failure = server.fail
    server.run()
    return server.exit_code
