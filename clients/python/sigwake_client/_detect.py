"""What the calling process can tell the agent about itself: its event-loop
runtime and the wakeup fd its signal handler writes to.

Neither function imports trio or asyncio: a program that has not imported
one is not running it, and importing it here would change the answer.
"""
import signal
import sys
import threading
import warnings


def detect_runtime():
    """The runtime of the loop running in this thread: "trio"; for a running
    asyncio loop "uvloop" (uvloop's loop class), "tornado" (tornado's IOLoop
    imported: tornado runs on asyncio) or "asyncio"; "twisted" while a
    Twisted reactor runs (Twisted imports asyncio too, so that alone says
    nothing). With no loop running: "trio"/"asyncio" if only the module is
    imported (trio first), else "unknown"."""
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_trio_token()
            return "trio"
        except Exception:  # RuntimeError outside a run; AttributeError on a very old trio
            pass
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            if type(loop).__module__.split(".")[0] == "uvloop":
                return "uvloop"
            if "tornado.ioloop" in sys.modules:
                return "tornado"
            return "asyncio"
    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is not None and getattr(reactor, "running", False):
        return "twisted"
    if trio is not None:
        return "trio"
    if asyncio is not None:
        return "asyncio"
    return "unknown"


def detect_wakeup_fd(runtime=None):
    """The fd set with signal.set_wakeup_fd(), or None if there is none or
    this is not the main thread of the main interpreter (the only place
    Python lets anyone read it).

    Python has no getter: set_wakeup_fd(-1) returns the previous fd, which
    is set back at once. The restore must also pass warn_on_full_buffer,
    which cannot be read either: trio sets it to False, asyncio and plain
    signal.set_wakeup_fd() leave it True, so it follows `runtime`
    (detected when None).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    if runtime is None:
        runtime = detect_runtime()
    # A signal handled between the two calls would find no wakeup fd, and
    # its wakeup byte would be lost: the very failure sigwake looks for.
    # Block signals on this thread for the two calls; they are handled
    # right after. (A process-directed signal can still be handled by
    # another thread in this window; it is two system calls wide.)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        try:
            fd = signal.set_wakeup_fd(-1)
        except ValueError:  # a sub-interpreter, or the main thread of a non-main interpreter
            return None
        try:
            signal.set_wakeup_fd(fd, warn_on_full_buffer=(runtime != "trio"))
        except (ValueError, OSError) as exc:
            # Only if the program broke its own fd since setting it (closed
            # it, or made it blocking): Python will not take it back.
            warnings.warn("sigwake_client: could not set the wakeup fd %d back (%s); it is now unset" % (fd, exc), RuntimeWarning, stacklevel=2)
            return None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return fd if fd >= 0 else None
