"""Client for the sigwake agent's actor registration socket (stdlib only).

    import sigwake_client

    with sigwake_client.register("fetcher") as actor:
        ...  # the agent now knows this process as actor "fetcher"

See README.md, and docs/CONTRACTS.md in the sigwake repository for the
protocol.
"""
import contextlib

from ._client import (
    ACTOR_FIELDS,
    DEFAULT_SOCKET,
    MAX_REQUEST_BYTES,
    SOCKET_ENV,
    AgentDisconnected,
    AgentTimeout,
    AgentUnavailable,
    Client,
    SigwakeError,
    default_path,
)
from ._detect import detect_runtime, detect_wakeup_fd

__version__ = "0.1.0"

__all__ = [
    "ACTOR_FIELDS",
    "DEFAULT_SOCKET",
    "MAX_REQUEST_BYTES",
    "SOCKET_ENV",
    "AgentDisconnected",
    "AgentTimeout",
    "AgentUnavailable",
    "Client",
    "SigwakeError",
    "default_path",
    "detect_runtime",
    "detect_wakeup_fd",
    "register",
]


@contextlib.contextmanager
def register(name, runtime=None, parent=None, policy=None, labels=None, wakeup_fd=None, path=None, timeout=5.0):
    """Registers the calling process as actor `name` for the duration of the
    `with` block and yields the actor dict the agent returned.

    `runtime` None: detected (detect_runtime()). `wakeup_fd` None: the fd
    the process's signal handler writes to, read on the main thread
    (detect_wakeup_fd()), sent only if there is one. Call it after the
    event loop has set its wakeup fd: inside trio.run(), or in asyncio
    after loop.add_signal_handler().

    On exit the actor is deregistered; that it is already gone
    (`not_registered`, e.g. the agent restarted) or that the agent cannot
    be reached is ignored. Registration errors are raised: SigwakeError,
    AgentUnavailable.

    The socket calls block, briefly (a local socket, `timeout` at most):
    fine at start-up, even inside an async function.
    """
    if runtime is None:
        runtime = detect_runtime()
    if wakeup_fd is None:
        wakeup_fd = detect_wakeup_fd(runtime)
    client = Client(path, timeout)
    try:
        actor = client.register(
            name, runtime=runtime, parent=parent, policy=policy, labels=labels, wakeup_fd=wakeup_fd
        )
    finally:
        # No connection is held for the actor's lifetime (the agent drops
        # idle ones after 30 s anyway); deregistering opens a new one.
        client.close()
    try:
        yield actor
    finally:
        try:
            # pid left out on purpose: "the calling process". In a child
            # forked inside the block that is the child, which is not
            # registered (ignored below), not the parent's actor.
            client.deregister()
        except AgentUnavailable:
            pass
        except SigwakeError as exc:
            if exc.code != "not_registered":
                raise
        finally:
            client.close()
