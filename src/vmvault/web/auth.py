"""Sessions, CSRF tokens and the login rate limit (no web framework needed here).

* A session is 32 random bytes (the cookie's value) mapped, in memory, to its user, its
  CSRF token and its times. It ends after ``session_idle`` without a request, after
  ``session_max`` in any case, at logout, and when its user is removed or loses the role.
  A server restart ends every session.
* Every state-changing request made with a session cookie must carry the session's CSRF
  token (form field ``csrf_token`` or header ``X-CSRF-Token``), compared in constant time.
  The login form has its own token, bound to a short-lived cookie (double submit), so a
  page elsewhere cannot log a browser in either.
* Failed logins are counted per user name and per client address: after
  ``login_attempts`` failures within ``lockout`` seconds, further attempts from that address
  or for that name are refused for ``lockout`` seconds, without checking the password (so a
  locked account costs no key derivation either). A browser with a good device cookie for
  the name (web/users.py) is counted on its own instead, by the cookie's id: it is not
  locked out by others' failures, nor they by its.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["LoginLimiter", "Session", "SessionStore"]


@dataclass
class Session:
    id: str
    user: str
    role: str
    csrf: str
    created: float
    seen: float

    def csrf_ok(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(self.csrf.encode(), token.encode())


@dataclass
class SessionStore:
    idle: float
    maximum: float
    clock: Callable[[], float] = time.monotonic
    _sessions: dict[str, Session] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def create(self, user: str, role: str) -> Session:
        now = self.clock()
        s = Session(secrets.token_urlsafe(32), user, role, secrets.token_urlsafe(32), now, now)
        with self._lock:
            self._expire(now)
            self._sessions[s.id] = s
        return s

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        now = self.clock()
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                return None
            if now - s.seen > self.idle or now - s.created > self.maximum:
                del self._sessions[session_id]
                return None
            s.seen = now
            return s

    def end(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)

    def end_user(self, user: str) -> int:
        """End every session of ``user`` (removed, or its role changed); returns how many."""
        with self._lock:
            gone = [k for k, s in self._sessions.items() if s.user == user]
            for k in gone:
                del self._sessions[k]
            return len(gone)

    def _expire(self, now: float) -> None:
        for k, s in list(self._sessions.items()):
            if now - s.seen > self.idle or now - s.created > self.maximum:
                del self._sessions[k]


@dataclass
class LoginLimiter:
    """Failures per key (``user:NAME``, ``addr:ADDRESS``, ``device:ID``) within a sliding window."""

    attempts: int
    lockout: float
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, deque[float]] = field(default_factory=dict)
    _locked_until: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def retry_after(self, *keys: str) -> float:
        """Seconds until ``keys`` may try again (0: now)."""
        now = self.clock()
        with self._lock:
            return max([0.0] + [self._locked_until.get(k, 0.0) - now for k in keys])

    def failed(self, *keys: str) -> bool:
        """Count a failure; True when it starts a lockout."""
        now = self.clock()
        started = False
        with self._lock:
            if len(self._failures) > 10000:  # a flood of names: forget the oldest windows
                for k in list(self._failures)[:5000]:
                    del self._failures[k]
            if len(self._locked_until) > 10000:  # a flood of addresses: forget lockouts that ended
                for k, until in list(self._locked_until.items()):
                    if until <= now:
                        del self._locked_until[k]
            for k in keys:
                q = self._failures.setdefault(k, deque())
                q.append(now)
                while q and now - q[0] > self.lockout:
                    q.popleft()
                if len(q) >= self.attempts and self._locked_until.get(k, 0.0) <= now:
                    self._locked_until[k] = now + self.lockout
                    q.clear()
                    started = True
        return started

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self._failures.pop(k, None)
