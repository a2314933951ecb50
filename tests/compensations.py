"""The compensations of ``tests/reliability_views.py``'s ``/compensated/`` checkout.

Found by autodiscovery (an installed app's ``compensations.py``), also in a process that never
imported the views, such as ``manage.py idempotency_abandoned --compensate``. Each writes a
line to ``RELIABILITY_HOLD_DIR/compensations.log`` (name, derived key, process), which every
process and the test can read. A file ``fail-<name>`` there makes that compensation raise, and
a file ``slow`` makes each take half a second.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

from django_idempotency.phases import compensation
from tests.models import Charge
from tests.reliability_views import provider_charge


class CompensationFailed(Exception):
    """Raised by a compensation whose ``fail-<name>`` file exists."""


def _directory() -> Path:
    return Path(os.environ["RELIABILITY_HOLD_DIR"])


def _journal(name: str, key: str) -> None:
    directory = _directory()
    if (directory / "slow").exists():
        time.sleep(0.5)
    if (directory / f"fail-{name}").exists():
        raise CompensationFailed(f"{name} failed")
    with (directory / "compensations.log").open("a") as log:
        fcntl.flock(log, fcntl.LOCK_EX)
        log.write(f"{name} {key} {os.getpid()}\n")


def journal(hold_dir: Path | None = None, *, processes: bool = False) -> list[tuple[str, ...]]:
    """Each compensation run so far, in order, as ``(name, key)`` (``(name, key, pid)`` with
    ``processes``)."""
    path = (hold_dir or _directory()) / "compensations.log"
    if not path.exists():
        return []
    width = 3 if processes else 2
    return [tuple(line.split()[:width]) for line in path.read_text().splitlines()]


@compensation("tests-cancel-order")
def cancel_order(order: Any, *, key: str) -> None:
    """A local compensation: a cancellation row, committed with its record on the key."""
    Charge.objects.create(amount=-7, note=f"cancel:{order}")
    _journal("cancel-order", key)


@compensation("tests-refund-charge")
def refund_charge(payment: Any, *, key: str) -> None:
    """A foreign compensation: a refund at the provider, keyed by the derived key."""
    _journal("refund-charge", key)
    provider_charge(f"refund-{key}", -payment["amount"])
