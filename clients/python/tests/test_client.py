"""Tests of sigwake_client against a fake agent.

Run from the repository root: python3 -m unittest discover -s clients/python/tests

The fake agent is a socketserver.UnixStreamServer in a thread, driven by a
script: each step is the exact request line the client must send and what
to answer (in chunks, with pauses, so one reply arrives in several recv()
calls; or a close halfway). Steps are consumed in order, across
connections.
"""
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import types
import tempfile
import threading
import time
import unittest
from unittest import mock

CLIENT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, CLIENT_DIR)

import sigwake_client  # noqa: E402
from sigwake_client import AgentDisconnected, AgentTimeout, AgentUnavailable, Client, SigwakeError  # noqa: E402

ACTOR = {
    "name": "fetcher",
    "pid": 4242,
    "runtime": "trio",
    "wakeup_fd": 7,
    "source": "socket",
    "state": "healthy",
    "labels": {"k": "v"},
}
# Pause between chunks: long enough that each lands in its own recv().
GAP = 0.05


def line(obj):
    # Raw UTF-8, not \u escapes: what the agent's serde_json writes.
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


class Step:
    """One exchange: `expect` (the exact request line), then `chunks` sent
    GAP apart, then the connection closed if `close`, after `hang` s."""

    def __init__(self, expect, chunks=(), close=False, hang=0.0):
        self.expect = expect
        self.chunks = list(chunks)
        self.close = close
        self.hang = hang


def ok(expect, reply):
    return Step(expect, [line(reply)])


class _Handler(socketserver.StreamRequestHandler):
    def handle(self):
        agent = self.server.agent
        with agent.lock:
            agent.connections += 1
            # A step without `expect`: sent on connection, before any request.
            greeting = agent.steps.pop(0) if agent.steps and agent.steps[0].expect is None else None
        if greeting is not None:
            for chunk in greeting.chunks:
                self.wfile.write(chunk)
            if greeting.close:
                return
        while True:
            request = self.rfile.readline()
            if not request:
                return
            with agent.lock:
                agent.requests.append(request)
                step = agent.steps.pop(0) if agent.steps else None
            if step is None:
                agent.errors.append("unexpected request %r" % request)
                return
            if request != step.expect:
                agent.errors.append("request %r, expected %r" % (request, step.expect))
                return
            for i, chunk in enumerate(step.chunks):
                if i:
                    time.sleep(GAP)
                self.wfile.write(chunk)
            time.sleep(step.hang)
            if step.close:
                return


class FakeAgent:
    def __init__(self, steps=()):
        self.dir = tempfile.mkdtemp(prefix="sigwake-test-")
        self.path = os.path.join(self.dir, "registry.sock")
        self.steps = list(steps)
        self.requests = []
        self.errors = []
        self.connections = 0
        self.lock = threading.Lock()
        self.server = socketserver.ThreadingUnixStreamServer(self.path, _Handler)
        self.server.daemon_threads = True
        self.server.agent = self
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        """The agent goes away: socket closed and removed."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class AgentTest(unittest.TestCase):
    """Each test gets self.agent(steps) and has its script checked at the end."""

    def setUp(self):
        self._agents = []

    def agent(self, *steps):
        a = FakeAgent(steps)
        self._agents.append(a)
        self.addCleanup(a.cleanup)
        return a

    def tearDown(self):
        for a in self._agents:
            # Let a handler that is still between steps finish its bookkeeping.
            time.sleep(0.01)
            self.assertEqual(a.errors, [], "the fake agent saw unexpected requests")
            self.assertEqual(a.steps, [], "the client skipped requests of the script")


class RequestLines(AgentTest):
    """Each call sends exactly the contract's request line and returns the reply's payload."""

    def test_ping(self):
        a = self.agent(ok(b'{"op":"ping"}\n', {"ok": True, "version": "0.1.0"}))
        with Client(a.path) as c:
            self.assertEqual(c.ping(), {"ok": True, "version": "0.1.0"})

    def test_register_all_fields_in_contract_order(self):
        a = self.agent(
            ok(
                b'{"op":"register","pid":4242,"name":"fetcher","runtime":"trio","parent":1,'
                b'"policy":"default","labels":{"k":"v"},"wakeup_fd":7}\n',
                {"ok": True, "actor": ACTOR},
            )
        )
        with Client(a.path) as c:
            actor = c.register(
                "fetcher", wakeup_fd=7, labels={"k": "v"}, policy="default", parent=1, runtime="trio", pid=4242
            )
        self.assertEqual(actor, ACTOR)

    def test_register_leaves_out_unset_fields(self):
        a = self.agent(ok(b'{"op":"register","name":"fetcher"}\n', {"ok": True, "actor": ACTOR}))
        with Client(a.path) as c:
            self.assertEqual(c.register("fetcher"), ACTOR)

    def test_register_sends_wakeup_fd_zero(self):
        # 0 is a valid fd: only None means "not given".
        a = self.agent(ok(b'{"op":"register","name":"x","wakeup_fd":0}\n', {"ok": True, "actor": ACTOR}))
        with Client(a.path) as c:
            c.register("x", wakeup_fd=0)

    def test_update(self):
        a = self.agent(
            ok(b'{"op":"update","pid":5,"name":"n","wakeup_fd":9}\n', {"ok": True, "actor": ACTOR}),
            ok(b'{"op":"update","policy":"strict"}\n', {"ok": True, "actor": ACTOR}),
        )
        with Client(a.path) as c:
            self.assertEqual(c.update(pid=5, wakeup_fd=9, name="n"), ACTOR)
            self.assertEqual(c.update(policy="strict"), ACTOR)

    def test_update_rejects_unknown_fields_without_sending(self):
        with Client("/nonexistent/sigwake.sock") as c:
            with self.assertRaisesRegex(TypeError, "wakeupfd"):
                c.update(wakeupfd=3)

    def test_deregister(self):
        a = self.agent(
            ok(b'{"op":"deregister"}\n', {"ok": True}),
            ok(b'{"op":"deregister","pid":77}\n', {"ok": True}),
        )
        with Client(a.path) as c:
            self.assertIsNone(c.deregister())
            self.assertIsNone(c.deregister(pid=77))

    def test_list(self):
        a = self.agent(ok(b'{"op":"list"}\n', {"ok": True, "actors": [ACTOR, ACTOR]}))
        with Client(a.path) as c:
            self.assertEqual(c.list(), [ACTOR, ACTOR])

    def test_one_connection_for_several_requests(self):
        a = self.agent(
            ok(b'{"op":"ping"}\n', {"ok": True, "version": "0.1.0"}),
            ok(b'{"op":"list"}\n', {"ok": True, "actors": []}),
            ok(b'{"op":"ping"}\n', {"ok": True, "version": "0.1.0"}),
        )
        with Client(a.path) as c:
            c.ping()
            c.list()
            c.ping()
        self.assertEqual(a.connections, 1)

    def test_too_large_request_is_refused_locally(self):
        with Client("/nonexistent/sigwake.sock") as c:
            with self.assertRaises(SigwakeError) as cm:
                c.register("x", labels={"big": "y" * (64 * 1024)})
        self.assertEqual(cm.exception.code, "too_large")

    def test_socket_path_from_environment(self):
        with mock.patch.dict(os.environ, {"SIGWAKE_SOCKET": "/tmp/elsewhere.sock"}):
            self.assertEqual(Client().path, "/tmp/elsewhere.sock")
            self.assertEqual(Client("/explicit.sock").path, "/explicit.sock")
        with mock.patch.dict(os.environ):
            os.environ.pop("SIGWAKE_SOCKET", None)
            self.assertEqual(Client().path, "/run/sigwake/registry.sock")


class ErrorReplies(AgentTest):
    def test_error_reply_raises_sigwake_error(self):
        a = self.agent(
            ok(
                b'{"op":"register","name":"fetcher"}\n',
                {"ok": False, "code": "already_registered", "error": "pid 4242 is already registered as fetcher"},
            ),
            # The connection stays usable after an error reply.
            ok(b'{"op":"ping"}\n', {"ok": True, "version": "0.1.0"}),
        )
        with Client(a.path) as c:
            with self.assertRaises(SigwakeError) as cm:
                c.register("fetcher")
            c.ping()
        err = cm.exception
        self.assertEqual(err.code, "already_registered")
        self.assertEqual(err.message, "pid 4242 is already registered as fetcher")
        self.assertEqual(str(err), "already_registered: pid 4242 is already registered as fetcher")
        self.assertEqual(a.connections, 1)

    def test_reply_that_is_not_json(self):
        a = self.agent(Step(b'{"op":"ping"}\n', [b"HTTP/1.1 400 Bad Request\n"]))
        with Client(a.path) as c:
            with self.assertRaises(SigwakeError) as cm:
                c.ping()
        self.assertEqual(cm.exception.code, "bad_reply")

    def test_reply_without_ok(self):
        a = self.agent(ok(b'{"op":"ping"}\n', {"version": "0.1.0"}))
        with Client(a.path) as c:
            with self.assertRaises(SigwakeError) as cm:
                c.ping()
        self.assertEqual(cm.exception.code, "bad_reply")

    def test_register_reply_without_actor(self):
        a = self.agent(ok(b'{"op":"register","name":"x"}\n', {"ok": True}))
        with Client(a.path) as c:
            with self.assertRaises(SigwakeError) as cm:
                c.register("x")
        self.assertEqual(cm.exception.code, "bad_reply")


class Unavailable(AgentTest):
    def test_missing_socket(self):
        path = os.path.join(tempfile.gettempdir(), "sigwake-test-missing-%d.sock" % os.getpid())
        with Client(path) as c:
            with self.assertRaises(AgentUnavailable) as cm:
                c.ping()
        err = cm.exception
        self.assertIsInstance(err, ConnectionError)
        self.assertEqual(err.path, path)
        msg = str(err)
        self.assertIn("not running at %s" % path, msg)
        self.assertIn("sudo cargo xtask run", msg)
        self.assertIn("sigwake run", msg)

    def test_refused_socket(self):
        # A socket file nobody listens on: what an agent that died leaves.
        d = tempfile.mkdtemp(prefix="sigwake-test-")
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "registry.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.close()
        with Client(path) as c:
            with self.assertRaises(AgentUnavailable) as cm:
                c.ping()
        self.assertIn("not running at %s" % path, str(cm.exception))
        self.assertIn("connection refused", str(cm.exception))
        self.assertIsInstance(cm.exception.__cause__, ConnectionRefusedError)


class Streams(AgentTest):
    """How replies arrive: split, cut short, late, or with extra bytes."""

    def test_reply_split_across_recvs(self):
        reply = line({"ok": True, "actor": dict(ACTOR, name="f\u00e9tcher \u2192 \U0001f600")})
        # Cut inside a multi-byte UTF-8 sequence too: decoding must wait for the whole line.
        cut = reply.index("\u2192".encode()) + 1
        chunks = [reply[:3], reply[3:cut], reply[cut:-1], reply[-1:]]
        a = self.agent(Step(b'{"op":"register","name":"fetcher"}\n', chunks))
        with Client(a.path) as c:
            actor = c.register("fetcher")
        self.assertEqual(actor["name"], "f\u00e9tcher \u2192 \U0001f600")

    def test_agent_closes_mid_reply(self):
        a = self.agent(
            Step(b'{"op":"list"}\n', [b'{"ok":true,"act'], close=True),
            ok(b'{"op":"ping"}\n', {"ok": True, "version": "0.1.0"}),
        )
        with Client(a.path) as c:
            with self.assertRaises(AgentDisconnected) as cm:
                c.list()
            self.assertIsInstance(cm.exception, AgentUnavailable)
            self.assertIn("before replying (after 15 bytes of it)", str(cm.exception))
            # The next request goes over a new connection.
            c.ping()
        self.assertEqual(a.connections, 2)

    def test_agent_closes_without_replying(self):
        a = self.agent(Step(b'{"op":"ping"}\n', [], close=True))
        with Client(a.path) as c:
            with self.assertRaises(AgentDisconnected):
                c.ping()

    def test_agent_times_out(self):
        a = self.agent(Step(b'{"op":"ping"}\n', [], hang=1.0), ok(b'{"op":"ping"}\n', {"ok": True}))
        with Client(a.path, timeout=0.2) as c:
            start = time.monotonic()
            with self.assertRaises(AgentTimeout) as cm:
                c.ping()
            self.assertLess(time.monotonic() - start, 0.9)
            self.assertIsInstance(cm.exception, TimeoutError)
            self.assertIsInstance(cm.exception, AgentUnavailable)
            # Not read as the late reply to the timed-out request: a new connection.
            c.timeout = 5.0
            self.assertEqual(c.ping(), {"ok": True})
        self.assertEqual(a.connections, 2)

    def test_idle_timeout_reply_is_not_taken_for_the_next_reply(self):
        # The agent answers, later says the connection idled out, and closes it.
        idle = line({"ok": False, "code": "bad_request", "error": "idle for 30 s"})
        a = self.agent(
            Step(b'{"op":"ping"}\n', [line({"ok": True, "version": "0.1.0"}), idle], close=True),
            ok(b'{"op":"list"}\n', {"ok": True, "actors": []}),
        )
        with Client(a.path) as c:
            c.ping()
            time.sleep(4 * GAP)  # the idle reply and the close have arrived
            self.assertEqual(c.list(), [])
        self.assertEqual(a.connections, 2)

    def test_busy_agent_turns_a_new_connection_away(self):
        # Over its client cap, the agent writes a `busy` error and closes
        # without reading. Whether the request was sent before the close
        # (the reply is read) or after (the send fails: EPIPE), the client
        # reports `busy`.
        busy = line({"ok": False, "code": "busy", "error": "the agent serves at most 256 clients at once; retry later"})
        a = self.agent(Step(None, [busy], close=True), Step(None, [busy], close=True))

        class SlowClient(Client):
            def _connect(self):
                super()._connect()
                time.sleep(0.2)  # the agent has written and closed by now: the send fails

        for client in (Client(a.path), SlowClient(a.path)):
            with client as c:
                with self.assertRaises(SigwakeError) as cm:
                    c.ping()
            self.assertEqual(cm.exception.code, "busy")
        self.assertEqual(a.connections, 2)

    def test_extra_bytes_after_a_reply_drop_the_connection(self):
        a = self.agent(
            Step(b'{"op":"ping"}\n', [line({"ok": True, "version": "0.1.0"}) + line({"ok": True})]),
            ok(b'{"op":"list"}\n', {"ok": True, "actors": []}),
        )
        with Client(a.path) as c:
            c.ping()
            self.assertEqual(c.list(), [])
        self.assertEqual(a.connections, 2)


class RegisterContextManager(AgentTest):
    def test_registers_and_deregisters(self):
        a = self.agent(
            ok(b'{"op":"register","name":"worker","runtime":"other","labels":{"team":"x"}}\n', {"ok": True, "actor": ACTOR}),
            ok(b'{"op":"deregister"}\n', {"ok": True}),
        )
        with sigwake_client.register("worker", runtime="other", labels={"team": "x"}, path=a.path) as actor:
            self.assertEqual(actor, ACTOR)
            self.assertEqual(len(a.requests), 1)
        self.assertEqual(len(a.requests), 2)
        # No connection held across the block.
        self.assertEqual(a.connections, 2)

    def test_deregisters_when_the_block_raises(self):
        a = self.agent(
            ok(b'{"op":"register","name":"w","runtime":"other"}\n', {"ok": True, "actor": ACTOR}),
            ok(b'{"op":"deregister"}\n', {"ok": True}),
        )
        with self.assertRaisesRegex(RuntimeError, "boom"):
            with sigwake_client.register("w", runtime="other", path=a.path):
                raise RuntimeError("boom")
        self.assertEqual(len(a.requests), 2)

    def test_socket_path_from_environment(self):
        a = self.agent(
            ok(b'{"op":"register","name":"w","runtime":"other"}\n', {"ok": True, "actor": ACTOR}),
            ok(b'{"op":"deregister"}\n', {"ok": True}),
        )
        with mock.patch.dict(os.environ, {"SIGWAKE_SOCKET": a.path}):
            with sigwake_client.register("w", runtime="other"):
                pass

    def test_exit_ignores_not_registered(self):
        a = self.agent(
            ok(b'{"op":"register","name":"w","runtime":"other"}\n', {"ok": True, "actor": ACTOR}),
            ok(b'{"op":"deregister"}\n', {"ok": False, "code": "not_registered", "error": "agent restarted"}),
        )
        with sigwake_client.register("w", runtime="other", path=a.path):
            pass

    def test_exit_raises_other_errors(self):
        a = self.agent(
            ok(b'{"op":"register","name":"w","runtime":"other"}\n', {"ok": True, "actor": ACTOR}),
            ok(b'{"op":"deregister"}\n', {"ok": False, "code": "not_permitted", "error": "no"}),
        )
        with self.assertRaises(SigwakeError) as cm:
            with sigwake_client.register("w", runtime="other", path=a.path):
                pass
        self.assertEqual(cm.exception.code, "not_permitted")

    def test_exit_ignores_an_agent_gone_away(self):
        a = self.agent(ok(b'{"op":"register","name":"w","runtime":"other"}\n', {"ok": True, "actor": ACTOR}))
        with sigwake_client.register("w", runtime="other", path=a.path):
            a.stop()

    def test_failed_registration_raises_and_does_not_deregister(self):
        a = self.agent(
            ok(b'{"op":"register","name":"w","runtime":"other"}\n', {"ok": False, "code": "busy", "error": "later"}),
        )
        with self.assertRaises(SigwakeError):
            with sigwake_client.register("w", runtime="other", path=a.path):
                self.fail("the block ran without a registration")
        self.assertEqual(len(a.requests), 1)

    def test_unavailable_agent_raises(self):
        with self.assertRaises(AgentUnavailable):
            with sigwake_client.register("w", runtime="other", path="/nonexistent/registry.sock"):
                self.fail("the block ran without a registration")

    def test_sends_the_detected_wakeup_fd(self):
        r, w = socket.socketpair()
        self.addCleanup(r.close)
        self.addCleanup(w.close)
        w.setblocking(False)
        old = signal.set_wakeup_fd(w.fileno())
        self.addCleanup(signal.set_wakeup_fd, old)
        expect = b'{"op":"register","name":"w","runtime":"asyncio","wakeup_fd":%d}\n' % w.fileno()
        a = self.agent(ok(expect, {"ok": True, "actor": ACTOR}), ok(b'{"op":"deregister"}\n', {"ok": True}))
        with sigwake_client.register("w", runtime="asyncio", path=a.path):
            pass
        self.assertEqual(signal.set_wakeup_fd(w.fileno()), w.fileno(), "the wakeup fd was not set back")

    def test_detects_asyncio(self):
        a = self.agent(
            ok(b'{"op":"register","name":"w","runtime":"asyncio"}\n', {"ok": True, "actor": ACTOR}),
            ok(b'{"op":"deregister"}\n', {"ok": True}),
        )

        async def main():
            with sigwake_client.register("w", path=a.path) as actor:
                return actor

        old = signal.set_wakeup_fd(-1)  # no wakeup fd, whatever the test runner set
        self.addCleanup(signal.set_wakeup_fd, old)
        self.assertEqual(asyncio.run(main()), ACTOR)


class Detection(unittest.TestCase):
    def test_runtime_unknown_without_loops(self):
        with mock.patch.dict(sys.modules):
            sys.modules.pop("trio", None)
            sys.modules.pop("asyncio", None)
            self.assertEqual(sigwake_client.detect_runtime(), "unknown")

    def test_runtime_from_imported_modules(self):
        with mock.patch.dict(sys.modules):
            sys.modules.pop("trio", None)
            self.assertEqual(sigwake_client.detect_runtime(), "asyncio")  # imported, not running
            sys.modules["trio"] = _fake_trio(running=False)
            self.assertEqual(sigwake_client.detect_runtime(), "trio")  # both imported: trio first

    def test_runtime_running_asyncio_beats_imported_trio(self):
        async def detect():
            return sigwake_client.detect_runtime()

        with mock.patch.dict(sys.modules, {"trio": _fake_trio(running=False)}):
            self.assertEqual(asyncio.run(detect()), "asyncio")

    def test_runtime_of_loops_on_asyncio(self):
        async def detect():
            return sigwake_client.detect_runtime()

        class UvloopLoop(asyncio.SelectorEventLoop):
            pass

        # uvloop's loop class lives in the uvloop package.
        UvloopLoop.__module__ = "uvloop"
        loop = UvloopLoop()
        self.addCleanup(loop.close)
        self.assertEqual(loop.run_until_complete(detect()), "uvloop")
        with mock.patch.dict(sys.modules, {"tornado.ioloop": types.ModuleType("tornado.ioloop")}):
            self.assertEqual(asyncio.run(detect()), "tornado")
        self.assertEqual(asyncio.run(detect()), "asyncio")

    def test_runtime_running_twisted_reactor(self):
        reactor = types.SimpleNamespace(running=True)
        with mock.patch.dict(sys.modules, {"twisted.internet.reactor": reactor}):
            sys.modules.pop("trio", None)
            self.assertEqual(sigwake_client.detect_runtime(), "twisted")  # asyncio imported, not running
            reactor.running = False
            self.assertEqual(sigwake_client.detect_runtime(), "asyncio")

    def test_runtime_running_trio_fake(self):
        with mock.patch.dict(sys.modules, {"trio": _fake_trio(running=True)}):
            self.assertEqual(sigwake_client.detect_runtime(), "trio")

    def test_runtime_running_trio(self):
        try:
            import trio
        except ImportError:
            self.skipTest("trio is not installed (run with .venv/bin/python)")

        async def detect():
            return sigwake_client.detect_runtime(), sigwake_client.detect_wakeup_fd()

        runtime, fd = trio.run(detect)
        self.assertEqual(runtime, "trio")
        self.assertIsNotNone(fd)

    def test_wakeup_fd_read_and_restored(self):
        r, w = socket.socketpair()
        self.addCleanup(r.close)
        self.addCleanup(w.close)
        w.setblocking(False)
        old = signal.set_wakeup_fd(w.fileno())
        self.addCleanup(signal.set_wakeup_fd, old)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        self.assertEqual(sigwake_client.detect_wakeup_fd("trio"), w.fileno())
        self.assertEqual(signal.set_wakeup_fd(w.fileno()), w.fileno())
        # And the signal mask is as it was.
        self.assertEqual(signal.pthread_sigmask(signal.SIG_BLOCK, []), mask)

    def test_wakeup_fd_unset(self):
        old = signal.set_wakeup_fd(-1)
        self.addCleanup(signal.set_wakeup_fd, old)
        self.assertIsNone(sigwake_client.detect_wakeup_fd("unknown"))
        self.assertEqual(signal.set_wakeup_fd(-1), -1)

    def test_wakeup_fd_not_on_the_main_thread(self):
        got = []
        t = threading.Thread(target=lambda: got.append(sigwake_client.detect_wakeup_fd("asyncio")))
        t.start()
        t.join()
        self.assertEqual(got, [None])


def _fake_trio(running):
    import types

    def current_trio_token():
        if not running:
            raise RuntimeError("must be called from async context")
        return object()

    trio = types.ModuleType("trio")
    trio.lowlevel = types.SimpleNamespace(current_trio_token=current_trio_token)
    return trio


class Exceptions(unittest.TestCase):
    def test_hierarchy(self):
        self.assertTrue(issubclass(SigwakeError, Exception))
        self.assertFalse(issubclass(SigwakeError, OSError))
        self.assertTrue(issubclass(AgentUnavailable, ConnectionError))
        self.assertTrue(issubclass(AgentDisconnected, AgentUnavailable))
        self.assertTrue(issubclass(AgentTimeout, AgentUnavailable))
        self.assertTrue(issubclass(AgentTimeout, TimeoutError))

    def test_agent_unavailable_keeps_its_message(self):
        err = AgentUnavailable("the sigwake agent is not running at /x", "/x")
        self.assertEqual(str(err), "the sigwake agent is not running at /x")
        self.assertIsNone(err.errno)
        self.assertEqual(err.path, "/x")


class Cli(AgentTest):
    def run_cli(self, *args):
        env = dict(os.environ, PYTHONPATH=CLIENT_DIR)
        return subprocess.run(
            [sys.executable, "-m", "sigwake_client"] + list(args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            timeout=30,
        )

    def test_ping(self):
        a = self.agent(ok(b'{"op":"ping"}\n', {"ok": True, "version": "0.1.0"}))
        p = self.run_cli("--socket", a.path, "ping")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(json.loads(p.stdout), {"ok": True, "version": "0.1.0"})

    def test_list(self):
        a = self.agent(ok(b'{"op":"list"}\n', {"ok": True, "actors": [ACTOR]}))
        p = self.run_cli("--socket", a.path, "list")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(json.loads(p.stdout), [ACTOR])

    def test_error_reply(self):
        a = self.agent(ok(b'{"op":"list"}\n', {"ok": False, "code": "busy", "error": "try later"}))
        p = self.run_cli("--socket", a.path, "list")
        self.assertEqual(p.returncode, 1)
        self.assertIn(b"busy: try later", p.stderr)

    def test_agent_not_running(self):
        p = self.run_cli("--socket", "/nonexistent/registry.sock", "ping")
        self.assertEqual(p.returncode, 3)
        self.assertEqual(p.stdout, b"")
        self.assertIn(b"not running at /nonexistent/registry.sock", p.stderr)


if __name__ == "__main__":
    unittest.main()
