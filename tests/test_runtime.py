"""The process-wide allocator policy: freed memory is reused, not faulted in again."""

import subprocess
import sys

import pytest

# A fresh process touches 64 MB, frees it, and touches 64 MB again: the second touch's minor
# page faults tell whether the pages were kept (a few) or handed back and re-zeroed (~16,000).
_PROBE = """
import ctypes, resource, sys
from pipeline.runtime import keep_freed_memory
if sys.argv[1] == "tuned" and not keep_freed_memory():
    sys.exit(3)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
for touch in (1, 2):
    if touch == 2:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, touch, size)
    libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_touch_faults(policy: str) -> int:
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, policy], capture_output=True, text=True, check=False
    )
    if run.returncode == 3:
        pytest.skip("not glibc: keep_freed_memory has nothing to tune")
    assert run.returncode == 0, run.stderr
    return int(run.stdout)


def test_keep_freed_memory_reuses_freed_pages():
    pages = (64 << 20) // 4096
    assert _second_touch_faults("default") > pages // 2  # glibc unmapped the block
    assert _second_touch_faults("tuned") < pages // 20


def test_cli_sets_the_policy_without_loading_torch_for_prepare():
    code = (
        "import sys; from click.testing import CliRunner; from stages.cli import main; "
        "r = CliRunner().invoke(main, ['prepare', '--help']); "
        "print(r.exit_code, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "False"]
