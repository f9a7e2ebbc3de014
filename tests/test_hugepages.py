"""Host buffers ask for huge pages except in a VM whose balloon reports free pages to the host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import modelcache._pool as pool_module
from modelcache._hugepages import free_page_reporting, huge_pages_advised
from modelcache._pool import BufferPool
from modelcache._torch import allocate_host

MIB = 1 << 20

linux_only = pytest.mark.skipif(
    not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps"
)


def device(root: Path, name: str, device_id: str, features: str) -> None:
    """A virtio device in a sysfs-shaped tree: its id and negotiated feature bits, bit 0 first."""
    (root / name).mkdir(parents=True)
    (root / name / "device").write_text(device_id + "\n")
    (root / name / "features").write_text(features + "\n")


def vm_flags(address: int) -> list[str]:
    """The kernel's VmFlags of the mapping holding ``address`` (``hg``: MADV_HUGEPAGE)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_free_page_reporting_is_a_balloons_feature_bit_5(tmp_path: Path) -> None:
    """Only a balloon (virtio id 5) with feature bit 5 (REPORTING) set counts as reporting."""
    reporting = "0110010100000000000000000000000010"  # as a Firecracker balloon negotiates it
    device(tmp_path / "a", "virtio0", "0x0005", reporting)
    device(tmp_path / "a", "virtio1", "0x0001", "1" * 34)  # a network device, every bit set
    assert free_page_reporting(str(tmp_path / "a"))
    device(tmp_path / "b", "virtio0", "0x0005", "0110000100000000000000000000000010")
    device(tmp_path / "b", "virtio1", "0x0002", reporting)  # a block device: bit 5 is its own
    assert not free_page_reporting(str(tmp_path / "b"))


def test_free_page_reporting_without_virtio_is_none(tmp_path: Path) -> None:
    """No sysfs tree, or unreadable devices in it, report nothing (the advice stays on)."""
    assert not free_page_reporting(str(tmp_path / "missing"))
    (tmp_path / "c" / "virtio0").mkdir(parents=True)  # no files
    device(tmp_path / "c", "virtio1", "balloon", "111111")  # an id that is no number
    assert not free_page_reporting(str(tmp_path / "c"))


@linux_only
@pytest.mark.skipif(not BufferPool.available(), reason="needs Linux mmap/mremap")
def test_pool_buffers_ask_for_huge_pages_only_where_advised() -> None:
    """A fresh pooled buffer carries MADV_HUGEPAGE exactly when this machine is not reporting."""
    pool = BufferPool(limit=8 * MIB)
    tensor, view, faulted = pool.take(4 * MIB)
    assert faulted == 0
    assert ("hg" in vm_flags(tensor.data_ptr())) == huge_pages_advised()
    del tensor, view
    pool.close()


@linux_only
def test_host_buffers_ask_for_huge_pages_only_where_advised() -> None:
    """`allocate_host`'s large buffers carry MADV_HUGEPAGE exactly when advised."""
    tensor, view = allocate_host(4 * MIB)
    assert ("hg" in vm_flags(tensor.data_ptr())) == huge_pages_advised()
    del view, tensor


def test_huge_pages_advised_follows_the_balloon() -> None:
    """The process-wide decision is the negation of this machine's free page reporting."""
    assert huge_pages_advised() is not free_page_reporting()


@linux_only
@pytest.mark.skipif(not BufferPool.available(), reason="needs Linux mmap/mremap")
def test_buffers_for_direct_reads_ask_for_huge_pages_everywhere() -> None:
    """A buffer direct reads fill (``huge=True``) carries MADV_HUGEPAGE even where fresh buffers
    do not get it: fresh from the pool, reused from it, and from `allocate_host` (its lead kept)."""
    pool = BufferPool(limit=8 * MIB)
    plain, _, _ = pool.take(4 * MIB)
    plain.fill_(1)
    del plain
    reused, _, faulted = pool.take(4 * MIB, 512, huge=True)  # grown by a page for the lead
    assert faulted == 4 * MIB - 512 and "hg" in vm_flags(reused.data_ptr())
    fresh, _, _ = pool.take(2 * MIB, huge=True)
    assert "hg" in vm_flags(fresh.data_ptr())
    del reused, fresh
    pool.close()
    tensor, view = allocate_host(4 * MIB, 256, huge=True)
    assert tensor.data_ptr() % 4096 == 256 and "hg" in vm_flags(tensor.data_ptr())
    del view, tensor


@linux_only
@pytest.mark.skipif(not BufferPool.available(), reason="needs Linux mmap/mremap")
def test_a_buffer_for_buffered_reads_does_not_keep_a_reused_mappings_huge_advice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where fresh buffers get no huge pages (a balloon reports free pages), a buffer that is
    not for direct reads (a remote model of the same store) does not get them either by reusing
    a mapping a direct-read buffer had advised: its grown pages would fault in 2 MiB at a time
    (the cost `_hugepages` avoids). Taken for direct reads again, it asks again."""
    monkeypatch.setattr(pool_module, "huge_pages_advised", lambda: False)
    pool = BufferPool(limit=32 * MIB)
    direct, view, _ = pool.take(4 * MIB, 512, huge=True)
    assert "hg" in vm_flags(direct.data_ptr())
    del direct, view
    buffered, view, faulted = pool.take(8 * MIB)  # the same mapping, grown
    assert faulted and "hg" not in vm_flags(buffered.data_ptr())
    del buffered, view
    again, view, faulted = pool.take(8 * MIB, huge=True)
    assert faulted and "hg" in vm_flags(again.data_ptr())
    del again, view
    pool.close()
