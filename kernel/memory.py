"""Memory: per-service budgets and shared-memory regions for bulk payloads.

A budget is enforced by the OS on the service process (RLIMIT_AS, set by
:mod:`kernel.processes`). Shared-memory regions are files in /dev/shm, mode 0600, that
the kernel creates on a service's request and counts against that service's budget;
the kernel unlinks every region of an owner that dies, so a crash leaks nothing.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

SHM_DIR = Path("/dev/shm")


@dataclass
class Region:
    name: str
    owner: str
    size: int


class RegionTable:
    def __init__(self, prefix: str):
        self.prefix = prefix  # unique per kernel instance, so two kernels never collide
        self.regions: dict[str, Region] = {}
        self.reclaimed = 0

    def allocate(self, owner: str, size: int, budget: int) -> Region:
        used = self.bytes_of(owner)
        if budget and used + size > budget // 2:
            # Regions also live in the owner's address space when mapped: keep half the
            # budget for the process itself.
            raise MemoryError(f"{owner}: {used + size} bytes of shared memory would exceed half its budget ({budget})")
        name = f"{self.prefix}-{owner}-{secrets.token_hex(4)}"
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        region = Region(name=name, owner=owner, size=size)
        self.regions[name] = region
        return region

    def free(self, owner: str, name: str) -> bool:
        region = self.regions.get(name)
        if region is None or region.owner != owner:
            return False
        self._unlink(region)
        return True

    def reclaim(self, owner: str) -> int:
        """Unlink every region of ``owner`` (it died); returns how many."""
        mine = [r for r in self.regions.values() if r.owner == owner]
        for region in mine:
            self._unlink(region)
        self.reclaimed += len(mine)
        return len(mine)

    def bytes_of(self, owner: str) -> int:
        return sum(r.size for r in self.regions.values() if r.owner == owner)

    def _unlink(self, region: Region) -> None:
        self.regions.pop(region.name, None)
        try:
            os.unlink(SHM_DIR / region.name)
        except FileNotFoundError:
            pass

    def clear(self) -> None:
        for region in list(self.regions.values()):
            self._unlink(region)
