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
Each direction of a stream is a trio memory channel of capacity 0 with one thread blocked on
its grpc side:

- grpc -> trio: a pump thread (`trio.to_thread`, abandoned on cancel) iterates grpc's blocking
  iterator and hands each message over with `trio.from_thread.run(channel.send, ...)`. It
  blocks until trio takes the message, so an unread stream holds back the peer through HTTP/2
  flow control instead of filling a queue here.
- trio -> grpc: the grpc thread that consumes our iterator (grpc's request-consumer thread on
  the client, the RPC's pool thread on the server) pulls each message with
  `trio.from_thread.run(channel.receive, trio_token=...)`, so `send` returns once grpc took the
  message. On the server a response also carries an event that the pool thread sets when it
  comes back for the next one, which grpc does only after writing the previous one: server
  `send` returns once the message is written, so a slow peer stalls its producer (and callers
  can bound how many large messages are in grpc's buffers) instead of growing a backlog.

Cancellation crosses both ways:

- trio gives up -> the client cancels its grpc call (the pump's iteration fails and the thread
  exits); a server handler's task ends, which closes its channel, so the grpc thread's response
  iterator ends and grpc finishes the RPC (with the status the handler raised, if any).
- grpc ends (peer gone, server stopped) -> the client's pump closes both channels, so `receive`
  raises `trio.EndOfChannel` (clean end) or `RpcStatusError`, and `send` fails too; on the
  server a termination callback cancels the handler's cancel scope.

A thread still blocked after trio stopped listening (an abandoned pump, a grpc thread when the
trio run has finished) finds its channel closed or the run gone and returns quietly.
"""

from __future__ import annotations

import contextlib
import functools
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

# What a thread may see when trio is no longer there to take or give a message.
_TRIO_GONE = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.EndOfChannel,
    trio.RunFinishedError,
    trio.Cancelled,
)


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


class BidiStream(Generic[SendT, ReceiveT]):
    """The trio side of one bidirectional gRPC stream.

    `send` returns once grpc took the message (client) or wrote it to the transport (server).
    `receive` (and `async for`) ends with `trio.EndOfChannel` when the peer closed cleanly and
    raises `RpcStatusError` when the call failed; `send` on a finished stream raises the same
    error, or `trio.BrokenResourceError` after a clean end.
    """

    def __init__(
        self,
        send: Callable[[SendT], Awaitable[None]],
        incoming: trio.MemoryReceiveChannel[ReceiveT],
        ending: _Ending,
    ) -> None:
        self._send = send
        self._incoming = incoming
        self._ending = ending

    async def send(self, message: SendT) -> None:
        try:
            await self._send(message)
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
    requests_send, requests_receive = trio.open_memory_channel[SendT](0)
    responses_send, responses_receive = trio.open_memory_channel[ReceiveT](0)
    ending = _Ending()
    call = start_call(_pull_from_trio(requests_receive, token))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump_call, call, responses_send, requests_receive, ending)
            yield BidiStream(requests_send.send, responses_receive, ending)
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The pump never fails, so a group holds just what the caller's block raised: give
        # it back as it was raised, the nursery being an implementation detail.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        call.cancel()  # type: ignore[attr-defined]  # grpc's response iterator is also its Call
        requests_send.close()


async def _pump_call(
    call: Iterable[ReceiveT],
    responses: trio.MemorySendChannel[ReceiveT],
    requests: trio.MemoryReceiveChannel[Any],
    ending: _Ending,
) -> None:
    # Closing `requests` when the call is over makes a pending `send` fail instead of waiting
    # for a grpc consumer thread that already stopped pulling.
    with responses, requests:
        ending.error = await trio.to_thread.run_sync(
            _forward_to_trio,
            call,
            responses,
            abandon_on_cancel=True,
            limiter=trio.CapacityLimiter(1),  # this pump's own thread, outside trio's default cap
        )


def _forward_to_trio(
    messages: Iterable[Any], channel: trio.MemorySendChannel[Any]
) -> RpcStatusError | None:
    """Thread body: hand every message of a grpc iterator to trio; returns how the call ended."""
    try:
        for message in messages:
            trio.from_thread.run(channel.send, message)
    except grpc.RpcError as exc:
        # A client call raises itself (a grpc.Call with code/details); a server request
        # iterator raises a bare RpcError when the client cancelled.
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.CANCELLED
        details = exc.details() if isinstance(exc, grpc.Call) else "cancelled by the peer"
        return RpcStatusError(code, details or code.name)
    except _TRIO_GONE:
        pass
    return None


def _pull_from_trio(
    channel: trio.MemoryReceiveChannel[Any], token: trio.lowlevel.TrioToken
) -> Iterator[Any]:
    """The blocking iterator a grpc thread consumes: each item is one message sent from trio."""
    while True:
        try:
            message = trio.from_thread.run(channel.receive, trio_token=token)
        except _TRIO_GONE:
            return
        yield message


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
        responses_send, responses_receive = trio.open_memory_channel[tuple[Any, trio.Event]](0)
        call = _ServerCall()
        try:
            trio.from_thread.run_sync(
                nursery.start_soon,
                self._serve,
                request_iterator,
                responses_send,
                call,
                context.peer(),
                trio_token=token,
            )
        except (trio.RunFinishedError, RuntimeError):  # RuntimeError: the nursery just closed
            context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        if not context.add_callback(functools.partial(_call_in_trio, token, call.cancel)):
            _call_in_trio(token, call.cancel)  # the call had already terminated
        written: trio.Event | None = None
        try:
            while True:
                try:
                    message, written = trio.from_thread.run(
                        _next_response, responses_receive, written, trio_token=token
                    )
                except _TRIO_GONE:
                    break
                # grpc returns here for the next response only once this one is written.
                yield message
        finally:
            # If grpc stopped taking responses, a handler blocked in send must not wait forever.
            _call_in_trio(token, functools.partial(_stop_responses, responses_receive, written))
        if call.error is not None:
            context.abort(call.error.code, call.error.details)

    async def _serve(
        self,
        request_iterator: Iterator[Any],
        responses: trio.MemorySendChannel[tuple[Any, trio.Event]],
        call: _ServerCall,
        peer: str,
    ) -> None:
        requests_send, requests_receive = trio.open_memory_channel[Any](0)
        send = functools.partial(_send_until_written, responses)
        stream: BidiStream[Any, Any] = BidiStream(send, requests_receive, _Ending())
        # Stays the status if this task is cancelled by the server shutting down; when the call
        # itself terminated first, grpc ignores it.
        call.error = RpcStatusError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        with responses, trio.CancelScope() as scope:
            call.scope = scope
            if call.terminated:
                scope.cancel()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_pump_requests, request_iterator, requests_send)
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


async def _send_until_written(
    channel: trio.MemorySendChannel[tuple[Any, trio.Event]], message: Any
) -> None:
    written = trio.Event()
    await channel.send((message, written))
    await written.wait()


async def _next_response(
    channel: trio.MemoryReceiveChannel[tuple[Any, trio.Event]], written: trio.Event | None
) -> tuple[Any, trio.Event]:
    """In trio, for the grpc thread: mark the previous response written, take the next."""
    if written is not None:
        written.set()
    return await channel.receive()


def _stop_responses(channel: trio.MemoryReceiveChannel[Any], written: trio.Event | None) -> None:
    channel.close()
    if written is not None:
        written.set()


def _first_leaf(group: BaseExceptionGroup[RpcStatusError]) -> RpcStatusError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def _pump_requests(
    request_iterator: Iterator[Any], requests: trio.MemorySendChannel[Any]
) -> None:
    with requests:
        await trio.to_thread.run_sync(
            _forward_to_trio,
            request_iterator,
            requests,
            abandon_on_cancel=True,
            limiter=trio.CapacityLimiter(1),
        )


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
