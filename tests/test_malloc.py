from __future__ import annotations

import subprocess
import sys

import pytest

# A socket read of up to 256 KiB (the agent's size, from the local service and
# from the server) that gets a small message: Python allocates the whole
# buffer, then shrinks it.
READS = """
import resource, socket, sys
from tunnel._malloc import keep_freed_buffers
if sys.argv[1] == "tuned":
    assert keep_freed_buffers()
a, b = socket.socketpair()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2000):
    a.send(b"x" * 100)
    b.recv(262144)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_reads_reuse_memory_instead_of_faulting_it_in() -> None:
    faults = int(subprocess.check_output([sys.executable, "-c", READS, "tuned"], timeout=60))
    # Untuned, glibc here faults in both pages of every read (4,000 faults).
    assert faults < 200, f"{faults} page faults for 2,000 reads"
