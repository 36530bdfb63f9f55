"""The one module where grpcio's threads meet trio.

grpcio has no trio backend (grpc/grpc#25050), so its synchronous API runs in threads and this
module carries messages across, for both ends of a bidirectional stream:

- client: `open_bidi_stream(start_call)` starts a call on a grpc channel and yields a
  `BidiStream` whose `send` and `receive` are ordinary trio awaits;
- server: `StreamServicerBridge(handler)` is the grpc *behaviour* of a stream-stream method.
  grpc calls it on one of its pool threads; it runs `await handler(stream, peer)` as a trio task
  in the nursery of `StreamServicerBridge.run`;
- `serve_grpc_server(server)` starts a `grpc.Server` and stops it when cancelled.

Theory of operation
-------------------
Each direction of a stream has one grpc thread on its far side and hands over one message at
a time, with one-way signals only (no trio task per message, no thread waiting for trio to
run a coroutine), because these hand-offs are the control plane's cost per proxy and push:

- grpc -> trio (`_FromThread`): a pump thread (`trio.to_thread`, abandoned on cancel)
  iterates grpc's blocking iterator; each message is queued in trio with
  `TrioToken.run_sync_soon` and the thread then waits on a semaphore that trio's `receive`
  releases. So an unread stream holds back the peer through HTTP/2 flow control instead of
  filling a queue here.
- trio -> grpc (`_ToThread`): `send` puts the message on a thread-safe queue that the grpc
  thread consuming our iterator (grpc's request-consumer thread on the client, the RPC's pool
  thread on the server) blocks on, and waits for an event that the thread sets (through
  `run_sync_soon`): on the client when it takes the message; on the server when it comes
  back for the next one, which grpc does only after writing the previous one. So server
  `send` returns once the message is written: a slow peer stalls its producer (and callers
  can bound how many large messages are in grpc's buffers) instead of growing a backlog.

Cancellation crosses both ways:

- trio gives up -> the client cancels its grpc call (the pump's iteration fails and the thread
  exits); a server handler's task ends, which closes its outgoing queue, so the grpc thread's
  response iterator ends and grpc finishes the RPC (with the status the handler raised, if any).
- grpc ends (peer gone, server stopped) -> the pump ends the incoming side, so `receive`
  raises `trio.EndOfChannel` (clean end) or `RpcStatusError`, and `send` fails too; on the
  server a termination callback cancels the handler's cancel scope.

A thread still blocked after trio stopped listening (an abandoned pump, a grpc thread when the
trio run has finished) finds its queue closed or the run gone and returns quietly.
"""

from __future__ import annotations

import contextlib
import functools
import math
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

import grpc
import trio

from meshcore.log import get_logger

SendT = TypeVar("SendT")
ReceiveT = TypeVar("ReceiveT")

# How long a stopping server lets unary calls in flight finish; streams are cut at once by
# their owners being cancelled, so this only delays shutdown when a call is really running.
SERVER_STOP_GRACE_SECONDS = 1.0

_log = get_logger("grpc")


class RpcStatusError(Exception):
    """A gRPC call ended with, or a server handler ends its call with, a non-OK status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class _Ending:
    """How the grpc side of a stream ended: None while running or after a clean end."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: RpcStatusError | None = None


def _run_in_trio(token: trio.lowlevel.TrioToken, fn: Callable[..., object], *args: Any) -> bool:
    """From a grpc thread: have trio run `fn(*args)` soon; False if that trio run is gone."""
    try:
        token.run_sync_soon(fn, *args)
    except trio.RunFinishedError:
        return False
    return True


class _FromThread(Generic[ReceiveT]):
    """grpc thread -> trio: messages of one grpc iterator, one in flight at a time."""

    def __init__(self, token: trio.lowlevel.TrioToken, ending: _Ending) -> None:
        self._token = token
        self._ending = ending
        self._send, self._receive = trio.open_memory_channel[ReceiveT](math.inf)
        self._taken = threading.Semaphore(0)
        self._closed = False  # trio stopped receiving: the thread must not wait for it

    # grpc thread

    def forward(self, messages: Iterable[ReceiveT]) -> None:
        """Thread body: hand every message over; when the iterator ends, end this side with
        how the call ended."""
        error: RpcStatusError | None = None
        try:
            for message in messages:
                if self._closed or not _run_in_trio(self._token, self._deliver, message):
                    return
                self._taken.acquire()
        except grpc.RpcError as exc:
            # A client call raises itself (a grpc.Call with code/details); a server request
            # iterator raises a bare RpcError when the client cancelled.
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.CANCELLED
            details = exc.details() if isinstance(exc, grpc.Call) else "cancelled by the peer"
            error = RpcStatusError(code, details or code.name)
        finally:
            _run_in_trio(self._token, self._end, error)

    # trio thread

    def _deliver(self, message: ReceiveT) -> None:
        if self._closed:
            self._taken.release()
        else:
            self._send.send_nowait(message)

    def _end(self, error: RpcStatusError | None) -> None:
        # Set before the channel closes: a receiver seeing the end reads how it ended.
        self._ending.error = error
        self._send.close()

    async def receive(self) -> ReceiveT:
        message = await self._receive.receive()
        self._taken.release()
        return message

    def close(self) -> None:
        """Stop receiving; a thread waiting to hand over a message is let go."""
        if not self._closed:
            self._closed = True
            self._receive.close()
            self._taken.release()


_CLOSED = object()


class _Handoff:
    """One message on its way to the grpc thread. `taken` is set on that thread itself, before
    trio hears of it, so a call ending right after cannot make a delivered message look lost."""

    __slots__ = ("message", "taken", "done")

    def __init__(self, message: Any) -> None:
        self.message = message
        self.taken = False
        self.done = trio.Event()


class _ToThread(Generic[SendT]):
    """trio -> the grpc thread that consumes `messages()`: one message in flight at a time."""

    def __init__(self, token: trio.lowlevel.TrioToken, *, until_written: bool) -> None:
        """`until_written`: `send` returns once grpc wrote the message (it came back for the
        next one) rather than once it took it."""
        self._token = token
        self._until_written = until_written
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._in_flight: _Handoff | None = None
        self._broken = False  # the grpc thread stopped taking messages
        self._closed = False

    # trio thread

    async def send(self, message: SendT) -> None:
        """Returns once grpc took (or wrote) the message."""
        if self._broken or self._closed:
            raise trio.BrokenResourceError("the grpc side of this stream is gone")
        handoff = self._in_flight = _Handoff(message)
        self._queue.put(handoff)
        try:
            await handoff.done.wait()
        finally:
            self._in_flight = None
        if not handoff.taken:
            raise trio.BrokenResourceError("the grpc side of this stream is gone")

    def close(self) -> None:
        """No more messages: the grpc thread's iterator ends after the queued ones."""
        if not self._closed:
            self._closed = True
            self._queue.put(_CLOSED)

    def mark_gone(self) -> None:
        """The grpc side stopped taking messages: a waiting `send` whose message it did not
        take fails, as do later ones."""
        self._broken = True
        if self._in_flight is not None:
            self._in_flight.done.set()

    # grpc thread

    def messages(self) -> Iterator[SendT]:
        """The blocking iterator a grpc thread consumes."""
        given: _Handoff | None = None  # until_written: yielded, written once grpc is back
        while True:
            if given is not None:
                given.taken = True
                if not _run_in_trio(self._token, given.done.set):
                    return
            item = self._queue.get()
            if item is _CLOSED:
                return
            given = item
            if not self._until_written:
                given.taken = True
                _run_in_trio(self._token, given.done.set)
                given = None
            yield item.message


class BidiStream(Generic[SendT, ReceiveT]):
    """The trio side of one bidirectional gRPC stream.

    `send` returns once grpc took the message (client) or wrote it (server). `receive` (and
    `async for`) ends with `trio.EndOfChannel` when the peer closed cleanly and raises
    `RpcStatusError` when the call failed; `send` on a finished stream raises the same error, or
    `trio.BrokenResourceError` after a clean end.
    """

    def __init__(
        self, outgoing: _ToThread[SendT], incoming: _FromThread[ReceiveT], ending: _Ending
    ) -> None:
        self._outgoing = outgoing
        self._incoming = incoming
        self._ending = ending

    async def send(self, message: SendT) -> None:
        try:
            await self._outgoing.send(message)
        except trio.BrokenResourceError:
            self._raise_failure()
            raise

    async def receive(self) -> ReceiveT:
        try:
            return await self._incoming.receive()
        except trio.EndOfChannel:
            self._raise_failure()
            raise

    def __aiter__(self) -> BidiStream[SendT, ReceiveT]:
        return self

    async def __anext__(self) -> ReceiveT:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def _raise_failure(self) -> None:
        error = self._ending.error
        if error is not None:
            raise RpcStatusError(error.code, error.details) from None


async def _pump(incoming: _FromThread[Any], messages: Iterable[Any]) -> None:
    """Run `incoming.forward(messages)` on a thread of its own until the iterator ends."""
    finished = False
    try:
        await trio.to_thread.run_sync(
            incoming.forward,
            messages,
            abandon_on_cancel=True,
            limiter=trio.CapacityLimiter(1),  # this pump's own thread, outside trio's default cap
        )
        finished = True
    finally:
        if not finished:  # abandoned: let its thread go; nobody receives any more
            incoming.close()


# --- Client ---


@asynccontextmanager
async def open_bidi_stream(
    start_call: Callable[[Iterator[SendT]], Iterable[ReceiveT]],
) -> AsyncIterator[BidiStream[SendT, ReceiveT]]:
    """Start a stream-stream call and yield its trio side; leaving the block cancels the call.

    `start_call(request_iterator)` must start the call without blocking and return grpc's
    response iterator, e.g. `functools.partial(stub.Method, metadata=...)`.
    """
    token = trio.lowlevel.current_trio_token()
    ending = _Ending()
    requests: _ToThread[SendT] = _ToThread(token, until_written=False)
    responses: _FromThread[ReceiveT] = _FromThread(token, ending)
    call = start_call(requests.messages())
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump_call, call, responses, requests)
            yield BidiStream(requests, responses, ending)
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The pump never fails, so a group holds just what the caller's block raised: give
        # it back as it was raised, the nursery being an implementation detail.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        call.cancel()  # type: ignore[attr-defined]  # grpc's response iterator is also its Call
        requests.close()


async def _pump_call(call: Iterable[Any], responses: _FromThread[Any], requests: _ToThread[Any]) -> None:
    try:
        await _pump(responses, call)
    finally:
        # The call is over: a pending `send` fails instead of waiting for a grpc consumer
        # thread that already stopped pulling.
        requests.mark_gone()


def _call_in_trio(token: trio.lowlevel.TrioToken, fn: Callable[[], object]) -> None:
    """Run `fn` in the trio thread from a grpc thread, if that trio run is still there."""
    with contextlib.suppress(trio.RunFinishedError):
        trio.from_thread.run_sync(fn, trio_token=token)


# --- Server ---

StreamHandler = Callable[[BidiStream[Any, Any], str], Awaitable[None]]


class _ServerCall:
    """One RPC's state shared by its grpc thread and its trio task.

    `cancel` runs in the trio thread; `error` is written by the trio task before it closes the
    response channel and read by the grpc thread after seeing that channel end.
    """

    __slots__ = ("error", "scope", "terminated")

    def __init__(self) -> None:
        self.scope: trio.CancelScope | None = None
        self.terminated = False
        self.error: RpcStatusError | None = None

    def cancel(self) -> None:
        self.terminated = True
        if self.scope is not None:
            self.scope.cancel()


class StreamServicerBridge:
    """The grpc behaviour of a stream-stream method, served by a trio `handler(stream, peer)`.

    Register an instance with `grpc.stream_stream_rpc_method_handler(bridge, ...)`. Calls are
    served while `run()` is running and answered UNAVAILABLE otherwise. A handler ends its call
    with a status by raising `RpcStatusError`; any other exception is logged and becomes
    INTERNAL for that call only, as grpc does for its own handlers.
    """

    def __init__(self, handler: StreamHandler) -> None:
        self._handler = handler
        self._running: tuple[trio.lowlevel.TrioToken, trio.Nursery] | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the tasks of all calls until cancelled (which ends every call UNAVAILABLE)."""
        async with trio.open_nursery() as nursery:
            self._running = (trio.lowlevel.current_trio_token(), nursery)
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._running = None

    def __call__(
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        """grpc behaviour; runs on a grpc pool thread for the whole life of the call."""
        running = self._running
        if running is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "server is starting or shutting down")
        token, nursery = running
        responses: _ToThread[Any] = _ToThread(token, until_written=True)
        call = _ServerCall()
        try:
            trio.from_thread.run_sync(
                nursery.start_soon,
                self._serve,
                request_iterator,
                responses,
                call,
                context.peer(),
                trio_token=token,
            )
        except (trio.RunFinishedError, RuntimeError):  # RuntimeError: the nursery just closed
            context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        if not context.add_callback(functools.partial(_call_in_trio, token, call.cancel)):
            _call_in_trio(token, call.cancel)  # the call had already terminated
        try:
            # grpc comes back here for the next response only once the previous one is written.
            yield from responses.messages()
        finally:
            # grpc stopped taking responses: a handler blocked in send must not wait forever.
            _run_in_trio(token, responses.mark_gone)
        if call.error is not None:
            context.abort(call.error.code, call.error.details)

    async def _serve(
        self,
        request_iterator: Iterator[Any],
        responses: _ToThread[Any],
        call: _ServerCall,
        peer: str,
    ) -> None:
        token = trio.lowlevel.current_trio_token()
        requests: _FromThread[Any] = _FromThread(token, _Ending())
        stream: BidiStream[Any, Any] = BidiStream(responses, requests, _Ending())
        # Stays the status if this task is cancelled by the server shutting down; when the call
        # itself terminated first, grpc ignores it.
        call.error = RpcStatusError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        with trio.CancelScope() as scope:
            call.scope = scope
            if call.terminated:
                scope.cancel()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_pump, requests, request_iterator)
                    await self._handler(stream, peer)
                    nursery.cancel_scope.cancel()
                call.error = None
            except* RpcStatusError as group:
                call.error = _first_leaf(group)
            except* trio.BrokenResourceError:
                call.error = None  # the peer went away while we were sending to it
            except* Exception:
                _log.exception("stream handler failed", peer=peer)
                call.error = RpcStatusError(
                    grpc.StatusCode.INTERNAL, "internal error serving this stream (see server log)"
                )
            finally:
                # Written before the response iterator ends, so grpc's thread reads it after.
                responses.close()


def _first_leaf(group: BaseExceptionGroup[RpcStatusError]) -> RpcStatusError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def serve_grpc_server(
    server: grpc.Server,
    *,
    grace: float = SERVER_STOP_GRACE_SECONDS,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start `server` (ports already added) and stop it when cancelled, waiting up to `grace`."""
    server.start()
    try:
        task_status.started()
        await trio.sleep_forever()
    finally:
        stopped = server.stop(grace)
        with trio.CancelScope(shield=True), trio.move_on_after(grace + 1.0):
            await trio.to_thread.run_sync(stopped.wait, abandon_on_cancel=True)
