"""Per-identity workload certificates: fetched on demand, shared, renewed at half life.

Mirrors ztunnel's SecretManager (src/identity/manager.rs):

- `get(identity)` returns the cached certificate, or fetches one; concurrent callers for
  the same identity share a single fetch.
- `run()` renews every cached certificate at its `refresh_at` (half life). A failed renewal
  is retried with exponential backoff (0.5 s doubling to 150 s) while the still-valid
  certificate keeps being served; an expired one is never served.
- `forget(identity)` drops an identity (its last local workload left the node).

Two clocks: certificate times are wall-clock datetimes from `now()`; waiting uses trio's
clock, so tests drive hours of renewals in milliseconds with an autojump clock and a
`now` derived from `trio.current_time()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

import trio

from meshcore.identity.ca import CertificateAuthority, generate_key_and_csr
from meshcore.identity.certs import CertificateError, WorkloadCertificate
from meshcore.identity.spiffe import Identity
from meshcore.log import get_logger

INITIAL_BACKOFF = timedelta(milliseconds=500)
MAX_BACKOFF = timedelta(seconds=150)

_log = get_logger("certificates")


class CertificateUnavailable(Exception):
    """No valid certificate could be obtained for `identity`; `cause` is the provider's error."""

    def __init__(self, identity: Identity, cause: BaseException) -> None:
        super().__init__(f"no certificate for {identity}: {cause}")
        self.identity = identity
        self.cause = cause


class CertificateProvider(Protocol):
    """Where certificates come from: a local CA now, istiod_lite's CA service later."""

    async def fetch(self, identity: Identity) -> WorkloadCertificate: ...


class LocalCaProvider:
    """Issues certificates from an in-process CA: key and CSR made here, as with a remote CA."""

    def __init__(self, ca: CertificateAuthority, *, ttl: timedelta = timedelta(hours=24)) -> None:
        self._ca = ca
        self._ttl = ttl

    async def fetch(self, identity: Identity) -> WorkloadCertificate:
        await trio.lowlevel.checkpoint()
        key_pem, csr_pem = generate_key_and_csr(identity)
        chain = self._ca.sign_csr(csr_pem, identity, ttl=self._ttl)
        return WorkloadCertificate.from_pem(key_pem, chain, self._ca.roots_pem)


@dataclass(frozen=True, slots=True)
class CertificateManagerStatistics:
    certificates: int  # identities with a usable certificate
    renewals_failing: int  # identities whose last fetch failed and are backing off
    next_refresh: datetime | None  # earliest scheduled renewal attempt


class _Fetch:
    """One in-flight fetch that any number of callers wait on."""

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: WorkloadCertificate | None = None
        self.error: CertificateUnavailable | None = None


@dataclass(slots=True)
class _Entry:
    cert: WorkloadCertificate | None = None
    inflight: _Fetch | None = None
    renew_at: datetime | None = None  # None while a renewal is running or none is due
    backoff: timedelta | None = None  # set while renewals are failing


class CertificateManager:
    """Certificates for the identities this proxy serves; see the module docstring."""

    def __init__(
        self,
        provider: CertificateProvider,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._provider = provider
        self._now = now
        self._entries: dict[Identity, _Entry] = {}
        self._schedule_changed = trio.Event()

    async def get(self, identity: Identity) -> WorkloadCertificate:
        """A valid certificate for `identity`; raises CertificateUnavailable."""
        entry = self._entries.get(identity)
        if entry is None:
            entry = self._entries[identity] = _Entry()
        elif entry.cert is not None and not entry.cert.expired(self._now()):
            await trio.lowlevel.checkpoint()
            return entry.cert
        return await self._fetch(identity, entry)

    def get_nowait(self, identity: Identity) -> WorkloadCertificate | None:
        """The cached certificate if there is a valid one, else None (never fetches)."""
        entry = self._entries.get(identity)
        if entry is None or entry.cert is None or entry.cert.expired(self._now()):
            return None
        return entry.cert

    def forget(self, identity: Identity) -> None:
        """Stop caching and renewing `identity`; a fetch in flight still answers its callers."""
        if self._entries.pop(identity, None) is not None:
            self._schedule_changed.set()

    def statistics(self) -> CertificateManagerStatistics:
        now = self._now()
        due = [e.renew_at for e in self._entries.values() if e.renew_at is not None]
        return CertificateManagerStatistics(
            certificates=sum(
                1 for e in self._entries.values() if e.cert is not None and not e.cert.expired(now)
            ),
            renewals_failing=sum(1 for e in self._entries.values() if e.backoff is not None),
            next_refresh=min(due, default=None),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew certificates when due, until cancelled."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                self._schedule_changed = trio.Event()
                now = self._now()
                next_due: datetime | None = None
                for identity, entry in self._entries.items():
                    if entry.renew_at is None or entry.inflight is not None:
                        continue
                    if entry.renew_at <= now:
                        entry.renew_at = None
                        nursery.start_soon(self._renew, identity, entry)
                    elif next_due is None or entry.renew_at < next_due:
                        next_due = entry.renew_at
                if next_due is None:
                    await self._schedule_changed.wait()
                else:
                    delay = (next_due - now).total_seconds()
                    with trio.move_on_after(delay):
                        await self._schedule_changed.wait()

    # --- internals ---

    async def _renew(self, identity: Identity, entry: _Entry) -> None:
        with contextlib.suppress(CertificateUnavailable):  # _fetch_failed logs and reschedules
            await self._fetch(identity, entry)

    async def _fetch(self, identity: Identity, entry: _Entry) -> WorkloadCertificate:
        """Fetch a certificate for `entry`, or share the fetch already in flight."""
        while (shared := entry.inflight) is not None:
            await shared.done.wait()
            if shared.error is not None:
                raise CertificateUnavailable(identity, shared.error.cause)
            if shared.result is not None:
                return shared.result
            # That fetch was cancelled with its caller; the next waiter takes over.

        fetch = entry.inflight = _Fetch()
        try:
            cert = await self._provider.fetch(identity)
            if cert.identity != identity:
                raise CertificateError(f"CA issued a certificate for {cert.identity} instead")
        except Exception as exc:
            fetch.error = CertificateUnavailable(identity, exc)
            self._fetch_failed(identity, entry, fetch.error)
            raise fetch.error from exc
        else:
            fetch.result = cert
            self._fetch_succeeded(entry, cert)
            return cert
        finally:
            entry.inflight = None
            fetch.done.set()

    def _fetch_succeeded(self, entry: _Entry, cert: WorkloadCertificate) -> None:
        entry.cert = cert
        entry.backoff = None
        # A CA handing out certificates already past half life must not make us hammer it.
        entry.renew_at = max(cert.refresh_at, self._now() + INITIAL_BACKOFF)
        self._schedule_changed.set()

    def _fetch_failed(
        self, identity: Identity, entry: _Entry, error: CertificateUnavailable
    ) -> None:
        if entry.cert is None:
            # Nothing to keep serving; the next get() tries afresh.
            if self._entries.get(identity) is entry:
                del self._entries[identity]
            _log.warning("certificate fetch failed", identity=str(identity), error=str(error.cause))
            return
        entry.backoff = (
            INITIAL_BACKOFF if entry.backoff is None else min(entry.backoff * 2, MAX_BACKOFF)
        )
        entry.renew_at = self._now() + entry.backoff
        _log.warning(
            "certificate renewal failed",
            identity=str(identity),
            error=str(error.cause),
            retry_in_seconds=entry.backoff.total_seconds(),
            current_expires=entry.cert.not_after.isoformat(),
        )
        self._schedule_changed.set()
