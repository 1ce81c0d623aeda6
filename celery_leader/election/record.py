"""The lease record stored by a resource lock.

Stored as JSON (never pickle) with durations and times in milliseconds, so a
sub-second lease survives the round trip.  Times are the lock server's clock and
are informational: nobody compares them with a local clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class MalformedRecordError(ValueError):
    """The stored bytes are not a lease record this version understands."""


@dataclass(frozen=True)
class LeaderElectionRecord:
    holder_identity: str
    lease_duration: float  # seconds
    acquire_time: float = 0.0  # seconds since the epoch, lock server's clock
    renew_time: float = 0.0
    leader_transitions: int = 0
    # Fencing token: strictly increases with every change of holder.  A caller
    # asking to write a record with term 0 asks for a new term.
    term: int = 0
    # CAS version: a fresh counter value on every write, so bytes never repeat.
    version: int = 0
    # Which running elector holds it: a random id per lock object, so two
    # replicas given the same identity are still two holders.  '' in a record
    # written by an older celery-leader, or by a lock that cannot tell them apart.
    holder_instance: str = ""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "holderIdentity": self.holder_identity,
            "leaseDurationMs": round(self.lease_duration * 1000),
            "acquireTimeMs": round(self.acquire_time * 1000),
            "renewTimeMs": round(self.renew_time * 1000),
            "leaderTransitions": self.leader_transitions,
            "term": self.term,
            "version": self.version,
        }
        # A field of its own beside holderIdentity, so older readers (which
        # ignore unknown fields) still see the configured identity.
        if self.holder_instance:
            data["holderInstance"] = self.holder_instance
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    def held_by(self, identity: str, instance: str) -> bool:
        """True when this record names exactly that holder (identity and instance)."""
        return self.holder_identity == identity and self.holder_instance == instance

    @classmethod
    def from_json(cls, raw: bytes | str) -> LeaderElectionRecord:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # deep nesting
            raise MalformedRecordError(f"lease record is not JSON: {raw!r:.200}") from exc
        if not isinstance(data, dict):
            raise MalformedRecordError(f"lease record is not a JSON object: {raw!r:.200}")
        try:
            holder = data["holderIdentity"]
            if not isinstance(holder, str):
                raise TypeError("holderIdentity must be a string")
            instance = data.get("holderInstance", "")
            if not isinstance(instance, str):
                raise TypeError("holderInstance must be a string")
            return cls(
                holder_identity=holder,
                lease_duration=_int(data, "leaseDurationMs") / 1000.0,
                acquire_time=_int(data, "acquireTimeMs", 0) / 1000.0,
                renew_time=_int(data, "renewTimeMs", 0) / 1000.0,
                leader_transitions=_int(data, "leaderTransitions", 0),
                term=_int(data, "term"),
                version=_int(data, "version", 0),
                holder_instance=instance,
            )
        # ValueError/OverflowError: NaN, Infinity or a huge integer in a number field.
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise MalformedRecordError(
                f"lease record has a bad field ({exc}): {raw!r:.200}"
            ) from exc


def _int(data: dict[str, Any], field: str, default: int | None = None) -> int:
    value = data.get(field, default)
    if value is None:
        raise KeyError(field)
    # bool is an int subclass; a true/false duration is garbage, not 1 ms.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{field} must be a number, got {value!r}")
    return int(value)
