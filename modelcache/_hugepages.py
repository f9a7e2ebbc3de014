"""Whether host buffers should ask for transparent huge pages (``MADV_HUGEPAGE``), per process.

On a machine where the kernel has its free memory at hand, a fresh 1 GiB buffer faults in with
512 huge-page faults instead of 262,144 small ones, and faster. In a virtual machine whose
virtio balloon has *free page reporting* (Firecracker, QEMU, cloud VMs), the guest tells the host
which free blocks of 2 MiB (the reporting order is the huge-page order) it does not use, and the
host discards their memory. A huge page is one such block, so a fresh huge page is, more often
than not, one the host must back again, 4 KiB at a time, all counted as our CPU: faulting in a
fresh 1 GiB mapping with ``MADV_POPULATE_WRITE`` cost 1.1-2.9 s of CPU with the advice on the
2-core development VM against 0.42-0.44 s without it (3 rounds, alternated; no compaction or
reclaim in ``/proc/vmstat``), and a fresh cache's first S3 load of 1 GiB spent up to 2.8 s of
the prefault thread's CPU on it (benches/README.md, peer_loaders). Small pages come from
blocks below the reporting order and do not pay that. So buffers ask for huge pages unless such
a balloon is present; except buffers that direct reads fill (`BufferPool.take(huge=True)`):
the disk's DMA into 4 KiB pages scattered in physical memory is cut into more requests (a
virtio disk takes 254 segments a request), and a buffer keeps its pages from load to load, so
huge pages paid for once make every later direct load faster (`_direct`).
"""

from __future__ import annotations

import functools
import os

__all__ = ["free_page_reporting", "huge_pages_advised"]

_VIRTIO_ID_BALLOON = 5  # the virtio device id of a memory balloon
_VIRTIO_BALLOON_F_REPORTING = 5  # its feature bit: free page reporting


def free_page_reporting(devices: str = "/sys/bus/virtio/devices") -> bool:
    """Whether a virtio balloon under ``devices`` (sysfs) reports free pages to the host.

    Each device's ``features`` file is the negotiated feature bits as '0'/'1' characters, bit 0
    first. A missing or unreadable tree (not Linux, no virtio) reports nothing."""
    try:
        names = os.listdir(devices)
    except OSError:
        return False
    for name in names:
        try:
            with open(os.path.join(devices, name, "device")) as f:
                if int(f.read().strip(), 0) != _VIRTIO_ID_BALLOON:
                    continue
            with open(os.path.join(devices, name, "features")) as f:
                features = f.read().strip()
        except (OSError, ValueError):
            continue
        if len(features) > _VIRTIO_BALLOON_F_REPORTING and (
            features[_VIRTIO_BALLOON_F_REPORTING] == "1"
        ):
            return True
    return False


@functools.cache
def huge_pages_advised() -> bool:
    """Whether fresh host buffers get ``MADV_HUGEPAGE`` in this process (see the module)."""
    return not free_page_reporting()
