"""``malloc.return_large_blocks``: a large block freed after the threshold was raised goes back to the system."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from segment_export.malloc import return_large_blocks

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")

# In a fresh process (its malloc untouched by the test run): free a 6 MB block (glibc then raises its mmap
# threshold to 6 MB), then allocate, touch and free a 4 MB one, and print how many KiB stayed resident.
_CHILD = """
import sys
sys.path.insert(0, {plugins!r})
from segment_export.malloc import return_large_blocks
if {fixed}:
    assert return_large_blocks()
def resident_kib():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4
first = bytearray(6_000_000)
del first
before = resident_kib()
second = bytearray(4_000_000)
del second
print(resident_kib() - before)
"""


def _kept_kib(fixed: bool) -> int:
    import segment_export

    plugins = segment_export.__path__[0].rsplit("/", 1)[0]
    code = _CHILD.format(plugins=plugins, fixed=fixed)
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_the_threshold_is_set_on_glibc():
    assert return_large_blocks() is True


def test_a_freed_large_block_is_returned_with_the_threshold_fixed_and_kept_without():
    kept_dynamic, kept_fixed = _kept_kib(False), _kept_kib(True)
    assert kept_dynamic > 3_000  # the 4 MB block came from the heap and stayed resident
    assert kept_fixed < 500  # mapped on its own and unmapped when freed
