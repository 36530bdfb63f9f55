"""The trio -> grpc hand-off of meshcore.xds.grpc_bridge, driven from the test as the grpc
thread would drive it, so the orderings that are races between threads happen on cue."""

import pytest
import trio
import trio.testing

from meshcore.xds.grpc_bridge import _ToThread


@pytest.mark.parametrize("until_written", [False, True])
async def test_a_message_grpc_took_counts_as_sent_when_the_call_ends_before_the_sender_resumes(
    until_written,
):
    # The race seen in CI: grpc took the request, the call ended (here: the surrounding scope
    # was cancelled, which ends the pump) and only then did the sender run again. It used to
    # get BrokenResourceError for a message that had gone out.
    requests = _ToThread(trio.lowlevel.current_trio_token(), until_written=until_written)
    grpc_side = requests.messages()
    outcome = []

    async def sender():
        await requests.send("subscribe")
        outcome.append("sent")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        assert next(grpc_side) == "subscribe"
        if until_written:
            # The server's grpc thread comes back for the next response once this one is
            # written (here it finds the stream closed).
            requests.close()
            with pytest.raises(StopIteration):
                next(grpc_side)
        requests.mark_gone()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert outcome == ["sent"]
    with pytest.raises(trio.BrokenResourceError):
        await requests.send("later")


async def test_a_message_grpc_never_took_fails_when_the_call_ends():
    requests = _ToThread(trio.lowlevel.current_trio_token(), until_written=False)
    outcome = []

    async def sender():
        try:
            await requests.send("subscribe")
        except trio.BrokenResourceError:
            outcome.append("broken")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        requests.mark_gone()
    assert outcome == ["broken"]
