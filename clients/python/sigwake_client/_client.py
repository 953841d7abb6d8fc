"""The registration socket client.

Protocol (docs/CONTRACTS.md, "Registration socket protocol"): a Unix
stream socket; one JSON request object per line, one JSON reply object
per line, in order. Replies are `{"ok": true, ...}` or
`{"ok": false, "code": ..., "error": ...}`.
"""
import json
import os
import socket
import threading

DEFAULT_SOCKET = "/run/sigwake/registry.sock"
SOCKET_ENV = "SIGWAKE_SOCKET"

# The agent refuses (and disconnects) requests larger than this; checking
# it here gives a clean error instead of a broken pipe halfway through.
MAX_REQUEST_BYTES = 64 * 1024

# Optional actor fields of register/update, in the order they are sent
# (the order of the contract's table), whatever order the caller used.
ACTOR_FIELDS = ("name", "runtime", "parent", "policy", "labels", "wakeup_fd")

_START_HINT = (
    "start it with `sudo cargo xtask run` in a sigwake checkout, or `sigwake run`"
    " (set SIGWAKE_SOCKET if it listens on another path)"
)

# Python ignores SIGPIPE at start-up, but a program may have restored the
# default (CLI tools often do); MSG_NOSIGNAL keeps a write to a closed
# connection from killing it. Linux has it; elsewhere 0 (no flag).
_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)


def default_path():
    """The socket path: $SIGWAKE_SOCKET, else /run/sigwake/registry.sock."""
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class SigwakeError(Exception):
    """The agent answered `{"ok": false}`.

    `code` is the agent's code (`bad_request`, `too_large`, `not_permitted`,
    `no_such_process`, `already_registered`, `not_registered`, `busy`) or,
    for a reply that is not a protocol reply at all, `bad_reply`; `message`
    is the agent's human sentence.
    """

    def __init__(self, code, message):
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self):
        return "%s: %s" % (self.code, self.message)


class AgentUnavailable(ConnectionError):
    """No reply could be had from the agent: it is not running at `path`,
    refused the connection, went away, or did not answer in time."""

    def __init__(self, message, path=None):
        # A single argument: OSError would read two as (errno, strerror).
        super().__init__(message)
        self.path = path


class AgentDisconnected(AgentUnavailable):
    """The agent closed the connection before its reply was complete.

    The request may or may not have been applied."""


class AgentTimeout(AgentUnavailable, TimeoutError):
    """The agent did not answer within the client's timeout.

    The request may or may not have been applied."""


class Client:
    """A connection to the agent's registration socket.

    `path` defaults to $SIGWAKE_SOCKET, else /run/sigwake/registry.sock;
    `timeout` (seconds, None for none) bounds each connect, send and
    receive. The connection is opened on the first request and reopened
    when the agent has dropped it (it closes connections idle for 30 s).
    A Client may be shared between threads: requests are serialised.
    """

    def __init__(self, path=None, timeout=5.0):
        self.path = os.fspath(path) if path is not None else default_path()
        self.timeout = timeout
        self._sock = None
        self._buf = bytearray()
        self._lock = threading.Lock()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        return "Client(path=%r, timeout=%r)" % (self.path, self.timeout)

    def close(self):
        """Closes the connection, if open. The Client stays usable: the next
        request opens a new one."""
        sock, self._sock = self._sock, None
        self._buf = bytearray()
        if sock is not None:
            sock.close()

    # --- the protocol's requests ---

    def ping(self):
        """Returns the agent's reply, e.g. {"ok": true, "version": "0.1.0"}."""
        return self.request({"op": "ping"})

    def register(self, name, pid=None, runtime=None, parent=None, policy=None, labels=None, wakeup_fd=None):
        """Registers process `pid` (default: the calling process, as the agent
        sees it through SO_PEERCRED) as actor `name`; returns the actor.

        Fields left at None are not sent: the agent fills in its defaults.
        Nothing is detected here; see sigwake_client.register() for that.
        """
        fields = dict(name=name, runtime=runtime, parent=parent, policy=policy, labels=labels, wakeup_fd=wakeup_fd)
        return self._actor(self.request(_actor_request("register", pid, fields)))

    def update(self, pid=None, **fields):
        """Changes fields (any of ACTOR_FIELDS) of a registered actor; returns it."""
        unknown = sorted(set(fields) - set(ACTOR_FIELDS))
        if unknown:
            raise TypeError("update() got unknown actor field(s) %s; known: %s" % (", ".join(unknown), ", ".join(ACTOR_FIELDS)))
        return self._actor(self.request(_actor_request("update", pid, fields)))

    def deregister(self, pid=None):
        """Removes the actor of `pid` (default: the calling process)."""
        self.request(_actor_request("deregister", pid, {}))

    def list(self):
        """The actors the caller could signal, as a list of actor dicts."""
        actors = self.request({"op": "list"}).get("actors")
        if not isinstance(actors, list):
            raise SigwakeError("bad_reply", "the agent's list reply has no \"actors\" list")
        return actors

    # --- the exchange ---

    def request(self, req):
        """Sends one request object and returns the reply object when it is
        `{"ok": true, ...}`; raises SigwakeError for `{"ok": false}`."""
        line = json.dumps(req, separators=(",", ":")).encode() + b"\n"
        if len(line) - 1 > MAX_REQUEST_BYTES:
            raise SigwakeError(
                "too_large", "the request is %d bytes; the agent accepts at most %d" % (len(line) - 1, MAX_REQUEST_BYTES)
            )
        with self._lock:
            try:
                reply = self._exchange(line)
            except BaseException:
                # Half a request sent or a reply half read (or a timeout, or a
                # KeyboardInterrupt): the stream is out of step, and a late
                # reply would be taken for the next request's. Never reuse it.
                self.close()
                raise
        return self._parse(reply)

    def _exchange(self, line):
        if self._sock is not None and self._stale():
            self.close()
        reused = self._sock is not None
        if not reused:
            self._connect()
        try:
            self._send(line)
        except AgentDisconnected as exc:
            if not reused:
                # A new connection closed at once: the agent may have said
                # why first (`busy`: too many clients). Report that.
                try:
                    return self._read_line()
                except AgentUnavailable:
                    raise exc from None
            # The agent closed this idle connection between the staleness
            # check and the send. A closed peer took none of the request, so
            # sending it again on a new connection cannot apply it twice.
            self.close()
            self._connect()
            self._send(line)
        return self._read_line()

    def _stale(self):
        """True if the open connection cannot carry a new request: the agent
        closed it, or sent bytes nobody asked for (its idle-timeout error
        reply) that would otherwise be read as the next request's reply."""
        if self._buf:
            return True
        self._sock.settimeout(0)
        try:
            self._sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False  # nothing to read: open and idle, as it should be
        except OSError:
            return True
        finally:
            self._sock.settimeout(self.timeout)
        return True  # end of stream, or unsolicited bytes

    def _connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise AgentUnavailable(_unavailable_message(self.path, exc), self.path) from exc
        self._sock = sock
        self._buf = bytearray()

    def _send(self, data):
        view = memoryview(data)
        try:
            while view:
                view = view[self._sock.send(view, _MSG_NOSIGNAL):]
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise AgentDisconnected(
                "the sigwake agent at %s closed the connection before taking the request" % self.path, self.path
            ) from exc
        except socket.timeout as exc:
            raise AgentTimeout("the sigwake agent at %s did not take the request within %s s" % (self.path, self.timeout), self.path) from exc

    def _read_line(self):
        """The next reply line (without its newline), however the agent's
        bytes are split between recv() calls."""
        scanned = 0
        while True:
            newline = self._buf.find(b"\n", scanned)
            if newline >= 0:
                line = bytes(self._buf[:newline])
                # Anything after it was not asked for; _stale() sees it.
                del self._buf[: newline + 1]
                return line
            scanned = len(self._buf)
            try:
                chunk = self._sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            except socket.timeout as exc:
                raise AgentTimeout("the sigwake agent at %s did not reply within %s s" % (self.path, self.timeout), self.path) from exc
            if not chunk:
                got = " (after %d bytes of it)" % len(self._buf) if self._buf else ""
                raise AgentDisconnected(
                    "the sigwake agent at %s closed the connection before replying%s" % (self.path, got), self.path
                )
            self._buf += chunk

    @staticmethod
    def _parse(line):
        try:
            reply = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
            raise SigwakeError("bad_reply", "the agent's reply is not JSON: %r" % line[:200]) from None
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise SigwakeError("bad_reply", "the agent's reply has no boolean \"ok\": %r" % line[:200])
        if not reply["ok"]:
            raise SigwakeError(str(reply.get("code", "unknown")), str(reply.get("error", "")))
        return reply

    @staticmethod
    def _actor(reply):
        actor = reply.get("actor")
        if not isinstance(actor, dict):
            raise SigwakeError("bad_reply", "the agent's reply has no \"actor\" object")
        return actor


def _actor_request(op, pid, fields):
    """`{"op": op, "pid": pid, <fields in ACTOR_FIELDS order>}`, None values left out."""
    req = {"op": op}
    if pid is not None:
        req["pid"] = pid
    for key in ACTOR_FIELDS:
        if fields.get(key) is not None:
            req[key] = fields[key]
    return req


def _unavailable_message(path, exc):
    if isinstance(exc, FileNotFoundError):
        return "the sigwake agent is not running at %s (no socket there); %s" % (path, _START_HINT)
    if isinstance(exc, ConnectionRefusedError):
        # Also what a full listen backlog looks like, hence "or overloaded".
        return (
            "the sigwake agent is not running at %s (connection refused: a socket left by an agent that exited,"
            " or an overloaded one); %s" % (path, _START_HINT)
        )
    if isinstance(exc, PermissionError):
        return "cannot connect to the sigwake agent at %s: permission denied (the socket's or its directory's mode)" % path
    if isinstance(exc, socket.timeout):
        return "cannot connect to the sigwake agent at %s: timed out; is it running? %s" % (path, _START_HINT)
    return "cannot connect to the sigwake agent at %s: %s; is it running? %s" % (path, exc.strerror or exc, _START_HINT)
