"""CertificateManager: caching, shared fetches, renewal at half life, backoff, expiry.

Timing tests run on trio's autojump clock, with certificate time (`now`) derived from it, so
a day of renewals takes milliseconds.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
import trio
import trio.testing

from meshcore.identity.ca import CertificateAuthority, CsrError
from meshcore.identity.certs import WorkloadCertificate
from meshcore.identity.manager import (
    CertificateManager,
    CertificateUnavailable,
    LocalCaProvider,
)
from meshcore.identity.spiffe import Identity

CLIENT = Identity("cluster.local", "default", "client")
SERVER = Identity("cluster.local", "default", "server")
TTL = timedelta(hours=24)
START = datetime.now(UTC).replace(microsecond=0)


def fake_now() -> datetime:
    """Wall time that advances with trio's (mock) clock."""
    return START + timedelta(seconds=trio.current_time())


class ScriptedProvider:
    """Issues certificates valid from `fake_now()`; can be told to fail or to wait."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca
        self.failing = False
        self.gate: trio.Event | None = None
        self.attempts: list[float] = []  # trio times of fetch attempts

    async def fetch(self, identity: Identity) -> WorkloadCertificate:
        self.attempts.append(trio.current_time())
        if self.gate is not None:
            await self.gate.wait()
        else:
            await trio.lowlevel.checkpoint()
        if self.failing:
            raise ConnectionRefusedError("istiod unreachable")
        return self.ca.issue(identity, ttl=TTL, not_before=fake_now())


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


@pytest.fixture
def provider(ca: CertificateAuthority) -> ScriptedProvider:
    return ScriptedProvider(ca)


async def test_get_fetches_once_and_then_serves_the_cache(provider: ScriptedProvider) -> None:
    manager = CertificateManager(provider, now=fake_now)
    assert manager.get_nowait(CLIENT) is None
    first = await manager.get(CLIENT)
    assert first.identity == CLIENT
    assert await manager.get(CLIENT) is first
    assert manager.get_nowait(CLIENT) is first
    assert len(provider.attempts) == 1
    assert manager.statistics().certificates == 1


async def test_concurrent_callers_share_one_fetch(provider: ScriptedProvider) -> None:
    manager = CertificateManager(provider, now=fake_now)
    provider.gate = trio.Event()
    results: list[WorkloadCertificate] = []

    async def get(identity: Identity) -> None:
        results.append(await manager.get(identity))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(get, CLIENT)
        nursery.start_soon(get, SERVER)
        await trio.testing.wait_all_tasks_blocked()
        provider.gate.set()
    assert len(provider.attempts) == 2  # one per identity
    assert len({id(r) for r in results if r.identity == CLIENT}) == 1


async def test_a_cancelled_fetcher_hands_over_to_the_next_caller(
    provider: ScriptedProvider,
) -> None:
    manager = CertificateManager(provider, now=fake_now)
    provider.gate = trio.Event()
    got: list[WorkloadCertificate] = []

    async def patient() -> None:
        got.append(await manager.get(CLIENT))

    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as impatient:

            async def cancel_the_fetcher_once_patient_waits() -> None:
                nursery.start_soon(patient)
                await trio.testing.wait_all_tasks_blocked()
                impatient.cancel()

            nursery.start_soon(cancel_the_fetcher_once_patient_waits)
            await manager.get(CLIENT)  # starts the fetch, then is cancelled
        await trio.testing.wait_all_tasks_blocked()
        assert len(provider.attempts) == 2  # patient took over
        provider.gate.set()
    assert got[0].identity == CLIENT


async def test_failed_fetch_names_identity_and_cause_and_is_not_cached(
    provider: ScriptedProvider,
) -> None:
    manager = CertificateManager(provider, now=fake_now)
    provider.failing = True
    with pytest.raises(CertificateUnavailable) as raised:
        await manager.get(CLIENT)
    assert raised.value.identity == CLIENT
    assert isinstance(raised.value.cause, ConnectionRefusedError)
    assert str(raised.value) == f"no certificate for {CLIENT}: istiod unreachable"
    assert manager.statistics().certificates == 0

    provider.failing = False
    assert (await manager.get(CLIENT)).identity == CLIENT
    assert len(provider.attempts) == 2


async def test_renews_at_half_life(
    provider: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    manager = CertificateManager(provider, now=fake_now)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        first = await manager.get(CLIENT)
        assert manager.statistics().next_refresh == first.refresh_at

        half_life = (first.refresh_at - fake_now()).total_seconds()
        await trio.sleep(half_life - 1)
        assert manager.get_nowait(CLIENT) is first
        await trio.sleep(2)
        second = manager.get_nowait(CLIENT)
        assert second is not None and second is not first
        assert second.not_before == first.refresh_at

        await trio.sleep(half_life)
        third = manager.get_nowait(CLIENT)
        assert third is not None and third.not_before == second.refresh_at
        assert provider.attempts == [0, pytest.approx(half_life), pytest.approx(2 * half_life)]
        nursery.cancel_scope.cancel()


async def test_failed_renewal_backs_off_and_keeps_serving_the_valid_certificate(
    provider: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    manager = CertificateManager(provider, now=fake_now)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        first = await manager.get(CLIENT)
        provider.failing = True
        half_life = (first.refresh_at - fake_now()).total_seconds()
        await trio.sleep(half_life + 600)

        retries = [b - a for a, b in itertools.pairwise(provider.attempts[1:])]
        assert retries[:11] == pytest.approx([0.5, 1, 2, 4, 8, 16, 32, 64, 128, 150, 150])
        assert manager.get_nowait(CLIENT) is first
        assert await manager.get(CLIENT) is first
        assert manager.statistics().renewals_failing == 1

        provider.failing = False
        await trio.sleep(150)
        renewed = manager.get_nowait(CLIENT)
        assert renewed is not None and renewed is not first
        assert manager.statistics().renewals_failing == 0
        assert manager.statistics().next_refresh == renewed.refresh_at
        nursery.cancel_scope.cancel()


async def test_an_expired_certificate_is_never_served(
    provider: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    manager = CertificateManager(provider, now=fake_now)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        first = await manager.get(CLIENT)
        provider.failing = True
        await trio.sleep((first.not_after - fake_now()).total_seconds() + 1)
        assert manager.get_nowait(CLIENT) is None
        assert manager.statistics().certificates == 0
        with pytest.raises(CertificateUnavailable, match="istiod unreachable"):
            await manager.get(CLIENT)
        nursery.cancel_scope.cancel()


async def test_forgotten_identities_are_not_renewed(
    provider: ScriptedProvider, autojump_clock: trio.testing.MockClock
) -> None:
    manager = CertificateManager(provider, now=fake_now)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        await manager.get(CLIENT)
        await manager.get(SERVER)
        manager.forget(CLIENT)
        await trio.sleep(timedelta(hours=20).total_seconds())
        assert manager.get_nowait(CLIENT) is None
        assert manager.statistics().certificates == 1
        assert len(provider.attempts) == 2 + 1  # SERVER renewed at half life, CLIENT never
        nursery.cancel_scope.cancel()


async def test_local_ca_provider_issues_and_refuses(ca: CertificateAuthority) -> None:
    manager = CertificateManager(LocalCaProvider(ca, ttl=timedelta(hours=1)))
    cert = await manager.get(CLIENT)
    assert cert.identity == CLIENT
    assert cert.roots_pem == ca.roots_pem
    assert cert.not_after - cert.not_before == timedelta(hours=1, minutes=1)

    stranger = Identity("other.example", "default", "client")
    with pytest.raises(CertificateUnavailable) as raised:
        await manager.get(stranger)
    assert isinstance(raised.value.cause, CsrError)
    assert "other.example" in str(raised.value)
