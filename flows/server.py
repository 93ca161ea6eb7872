"""The temporary Prefect server of a CLI run, out of reach of the terminal's Ctrl-C.

Without a configured API (PREFECT_API_URL), Prefect starts a temporary server as a
child process in the CLI's process group, so a Ctrl-C in the terminal kills it at
once while the run still needs it to record task states: the run then fails with
connection errors and waits minutes on its event queue. The CLI instead starts that
server itself in a session of its own (a terminal's signals never reach it), puts it
where Prefect looks for its temporary server, and stops it when the run is over,
after the run has stopped cleanly.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator


def _free_port() -> int:
    import socket

    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent():
    """preexec_fn: on Linux the server gets SIGTERM when the CLI dies, even by SIGKILL (no orphan server)."""
    try:
        import ctypes
        import signal

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # looked up before the fork
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _api_configured() -> bool:
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


@contextlib.contextmanager
def temporary_server(startup_timeout_s: float | None = None) -> Iterator[object | None]:
    """A temporary Prefect server for the block, detached from the terminal; None when an API is configured."""
    if _api_configured():
        yield None
        return
    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    from tasks import interrupts

    class DetachedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                   "PREFECT__SERVER_FINAL": "1",
                   **get_current_settings().to_environment_variables(exclude_unset=True)}
            return subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                 "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                 "--log-level", "error", "--lifespan", "on"],
                env=env, start_new_session=True,  # its own session: Ctrl-C in the terminal does not reach it
                preexec_fn=_die_with_parent())

    server = DetachedServer(port=_free_port())
    previous = SubprocessASGIServer._instances.get(None)
    SubprocessASGIServer._instances[None] = server  # where Prefect's clients look for the temporary server
    if startup_timeout_s is None:  # a fresh PREFECT_HOME migrates its database first: slow on a busy small machine
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        startup_timeout_s = max(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()), 120.0)
    server.start(timeout=int(startup_timeout_s))

    def kill_now() -> None:  # a second Ctrl-C: the process exits at once, the server must not outlive it
        proc = server.server_process
        if proc is not None:
            proc.kill()

    interrupts.on_force_exit(kill_now)
    try:
        yield server
    finally:
        server.stop()
        if previous is None:
            SubprocessASGIServer._instances.pop(None, None)
        else:
            SubprocessASGIServer._instances[None] = previous
