"""The engine in a process of its own, so that the model and the HTTP event loop do not share one GIL.

In one process the engine thread and uvicorn's event loop take turns at the interpreter: while the loop encodes
and sends a token's chunk the decode step waits, and the other way round (on two cores, one stream's tokens/s
fell to about 0.6-0.7 of the engine's own rate). `EngineProcess` runs the same `Engine` in a child process and
stands in for it in the app: `start`, `submit`, `cancel`, `stop`, `alive`, `figures` and `config` mean what
they mean on Engine. The child is a fresh interpreter (`python -m spikelm.serving.engine_process FD`), not a
fork (which would copy torch's threads in whatever state they are) and not multiprocessing's spawn (which runs
the parent's main script again: a script that starts the server without an `if __name__ == "__main__"` guard
would start it twice).

One socket pair carries pickled messages (multiprocessing's Connection):
    parent -> child: (model, revision, engine kwargs, log level) first; then ("submit", request_id, prompt_ids,
                     params), ("cancel", request_id), ("figures",), ("stop",)
    child -> parent: ("ready", config) or ("failed", message) once, after loading the model;
                     ("events", [(request_id, event), ...]) once per engine step (the events Engine sends
                     together); ("figures", dict) in answer to ("figures",).
A reader thread in the parent hands each event to its request's `on_event`, as the engine thread does in one
process. The parent keeps the request bound itself (max_batch + max_queue requests not yet finished), so
`submit` refuses at once with EngineBusy, as Engine does; the child's queue has room beyond that bound for
requests the parent has cancelled and the child has not dropped yet. If the child dies, every open request gets
an error event and `alive` turns False (/health answers 503, new requests 503).
"""

import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path

from ..errors import SpikeLMError
from .engine import Engine, EngineBusy, EngineStopped, SequenceEvent

logger = logging.getLogger("spikelm.serving")


class RemoteSequence:
    """What `EngineProcess.submit` returns: the handle `cancel` takes."""

    __slots__ = ("request_id",)

    def __init__(self, request_id: str):
        self.request_id = request_id


class EngineProcess:
    """An Engine in a child process. `engine_kwargs` are Engine's (max_batch and max_queue apart)."""

    FIGURES_TIMEOUT_S = 5.0

    def __init__(self, model: str, revision=None, max_batch=32, max_queue=64, log_level=logging.INFO,
                 **engine_kwargs):
        self.model_name, self.revision = model, revision
        self.max_batch, self.max_queue = max_batch, max_queue
        self.log_level = log_level
        self.engine_kwargs = engine_kwargs
        self.config = None  # the model's config, from the child once it has loaded the model
        self._process = None
        self._conn = None
        self._reader = None
        self._listeners: dict[str, object] = {}  # request id -> on_event, for requests not yet finished
        self._lock = threading.Lock()  # guards _listeners and _stopping
        self._send_lock = threading.Lock()
        self._figures_lock = threading.Lock()  # one figures question at a time
        self._figures_ready = threading.Event()
        self._figures = None
        self._stopping = False
        self._ids = itertools.count()

    # ---------------------------------------------------------------- the parent's side
    def start(self):
        """Start the child and wait until it has loaded the model; raises SpikeLMError with the child's reason
        when it could not."""
        parent_end, child_end = socket.socketpair()
        # the child imports this package from where this process found it, installed or not
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH"))
                                                           if p)}
        self._process = subprocess.Popen([sys.executable, "-m", "spikelm.serving.engine_process",
                                          str(child_end.fileno())], pass_fds=(child_end.fileno(),), env=env)
        child_end.close()  # the child holds the only other end: its exit is our EOF
        self._conn = Connection(parent_end.detach())
        # the child's queue: the parent's bound, and as much again for cancelled requests not yet dropped there
        child_kwargs = dict(self.engine_kwargs, max_batch=self.max_batch,
                            max_queue=2 * (self.max_batch + self.max_queue))
        try:
            self._conn.send((self.model_name, self.revision, child_kwargs, self.log_level))
            kind, payload = self._conn.recv()
        except (EOFError, OSError):
            raise SpikeLMError(f"the engine process exited while loading {self.model_name} (exit code "
                               f"{self._end_child()}); the server's log has the cause") from None
        if kind == "failed":
            self._end_child()
            raise SpikeLMError(payload)
        self.config = payload
        self._reader = threading.Thread(target=self._read_events, name="spikelm-engine-events", daemon=True)
        self._reader.start()

    def _end_child(self):
        """Wait a little for a child that gave up, then kill it; -> its exit code."""
        try:
            return self._process.wait(5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            return self._process.wait(5)

    def stop(self, timeout=10.0):
        """Stop after the child's current step: every open request gets the shutdown error event."""
        with self._lock:
            self._stopping = True
        if self._process is None:
            return
        try:
            self._send(("stop",))
        except OSError:
            pass
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("the engine process did not stop within %g s; killing it", timeout)
            self._process.kill()
            self._process.wait(5)
        if self._reader is not None:
            self._reader.join(5)

    def submit(self, prompt_ids, params, on_event, request_id=None) -> RemoteSequence:
        """Queue a request; raises EngineBusy when every slot and the queue are taken, EngineStopped when the
        engine is stopping or gone. `on_event` is called from the reader thread."""
        request_id = request_id or f"seq-{next(self._ids)}"
        with self._lock:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if not self.alive:
                raise EngineStopped("the engine process has stopped: the server cannot generate; restart it")
            if len(self._listeners) >= self.max_batch + self.max_queue:
                raise EngineBusy(f"all {self.max_batch} slots and {self.max_queue} queue places are taken")
            if request_id in self._listeners:
                raise ValueError(f"request id {request_id!r} is already running")
            self._listeners[request_id] = on_event
        self._send(("submit", request_id, list(prompt_ids), params))
        return RemoteSequence(request_id)

    def cancel(self, sequence: RemoteSequence):
        with self._lock:
            known = self._listeners.pop(sequence.request_id, None) is not None
        if known and self.alive:
            try:
                self._send(("cancel", sequence.request_id))
            except OSError:  # the child is gone; the reader fails what is left
                pass

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None and self._reader is not None \
            and self._reader.is_alive()

    def figures(self) -> dict | None:
        """Engine.figures() of the child (a round trip: call it off the event loop); None when the child does
        not answer within FIGURES_TIMEOUT_S."""
        with self._figures_lock:
            if not self.alive:
                return None
            self._figures_ready.clear()
            try:
                self._send(("figures",))
            except OSError:
                return None
            if not self._figures_ready.wait(self.FIGURES_TIMEOUT_S):
                return None
            return self._figures

    def _send(self, message):
        with self._send_lock:
            self._conn.send(message)

    def _read_events(self):
        while True:
            try:
                kind, payload = self._conn.recv()
            except (EOFError, OSError):
                break
            if kind == "events":
                for request_id, event in payload:
                    self._dispatch(request_id, event)
            elif kind == "figures":
                self._figures = payload
                self._figures_ready.set()
        # the child has gone: whoever still waits is told
        with self._lock:
            left, self._listeners = self._listeners, {}
            stopping = self._stopping
        if left and not stopping:
            logger.error("the engine process stopped unexpectedly (exit code %s); failing %d open requests",
                         self._process.poll(), len(left))
        for request_id, on_event in left.items():
            if stopping:
                event = SequenceEvent(error="the server is shutting down: retry later", finish_reason="error",
                                      retryable=True)
            else:
                event = SequenceEvent(error=f"generation failed inside the server (request id {request_id}): "
                                            "its engine process stopped; the server's log has the cause",
                                      finish_reason="error")
            self._call(request_id, on_event, event)

    def _dispatch(self, request_id, event):
        with self._lock:
            on_event = self._listeners.get(request_id)
            if on_event is not None and (event.finish_reason is not None or event.error):
                del self._listeners[request_id]
        if on_event is not None:  # else cancelled here already: its late events are dropped
            self._call(request_id, on_event, event)

    def _call(self, request_id, on_event, event):
        try:
            on_event(event)
        except Exception:  # the listener's problem (e.g. its event loop closed): drop the request
            logger.exception("event delivery failed for request %s", request_id)
            self.cancel(RemoteSequence(request_id))


# ================================================================ the child's side


class PipedEngine(Engine):
    """An Engine whose events go down a pipe, one message per step, keyed by request id."""

    def __init__(self, conn, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conn = conn
        self._send_lock = threading.Lock()
        self._by_id = {}  # request id -> Sequence, while it runs (for cancel)

    def send(self, message) -> bool:
        try:
            with self._send_lock:
                self.conn.send(message)
            return True
        except OSError:  # the parent is gone: nobody to generate for
            return False

    def _deliver(self):
        outbox, self._outbox = self._outbox, []
        if not outbox:
            return
        for sequence, event in outbox:
            if event.finish_reason is not None or event.error:
                self._by_id.pop(sequence.request_id, None)
        if not self.send(("events", [(sequence.request_id, event) for sequence, event in outbox])):
            self._stopping = True

    def serve_commands(self):
        """The child's command loop (its own thread): until ("stop",) or the parent's end closes."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "submit":
                _, request_id, prompt_ids, params = message
                try:
                    self._by_id[request_id] = self.submit(prompt_ids, params, None, request_id=request_id)
                except (EngineBusy, EngineStopped) as error:
                    self.send(("events", [(request_id, SequenceEvent(error=f"{error}; retry later",
                                                                     finish_reason="error", retryable=True))]))
            elif kind == "cancel":
                sequence = self._by_id.pop(message[1], None)
                if sequence is not None:
                    self.cancel(sequence)
            elif kind == "figures":
                self.send(("figures", self.figures()))
            elif kind == "stop":
                break
        self.stop()


def _child_main(conn):
    model_name, revision, engine_kwargs, log_level = conn.recv()
    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s (engine process) %(levelname)s %(message)s")
    from ..loading import load_model_and_tokenizer

    try:
        model, tokenizer = load_model_and_tokenizer(model_name, revision=revision)
        engine = PipedEngine(conn, model, tokenizer, **engine_kwargs)
    except SpikeLMError as error:
        conn.send(("failed", str(error)))
        return
    except Exception as error:
        logger.exception("the engine process could not load %s", model_name)
        conn.send(("failed", f"could not load the model {model_name}: {type(error).__name__}: {error}"))
        return
    engine.start()
    conn.send(("ready", engine.config))
    commands = threading.Thread(target=engine.serve_commands, name="spikelm-engine-commands", daemon=True)
    commands.start()
    engine._thread.join()  # ends on ("stop",), when the parent goes, or if the engine thread itself fails
    if engine._stopping:
        commands.join(15)
    conn.close()


if __name__ == "__main__":  # the child: python -m spikelm.serving.engine_process FD
    _child_main(Connection(int(sys.argv[1])))
