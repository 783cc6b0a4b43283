"""What TorchServe holds in Java's direct memory (-XX:MaxDirectMemorySize in config.properties' vmargs), for the
tests of the bounds in front of it: the bodies still arriving (Netty reads them there) and each worker's batch
while it is copied to the worker (a direct copy of all its bodies). Past the limit an arrival gets 507 or its
connection closed, and a batch that cannot be copied is lost: 500 after responseTimeout (tests/test_hostile.py)."""
from __future__ import annotations

# Netty's own direct buffers besides the bodies (reads in progress, answers being written).
SPARE_MIB = 48


def mib(size: str) -> float:
    """A JVM size flag's value (``896m``, ``1g``) in MiB."""
    return float(size[:-1]) * {"m": 1, "g": 1024}[size[-1].lower()]


def jvm_flag_mib(vmargs: str, prefix: str) -> float:
    return mib(next(flag[len(prefix):] for flag in vmargs.split() if flag.startswith(prefix)))


def room_for_arrivals_mib(props: dict[str, str], workers: int, batch_size: int) -> float:
    """Direct memory left for bodies arriving at once once every worker's batch of the largest bodies is copied."""
    batch_copies = workers * batch_size * int(props["max_request_size"]) / 2**20
    return jvm_flag_mib(props["vmargs"], "-XX:MaxDirectMemorySize=") - batch_copies - SPARE_MIB


# A TorchServe pod's memory besides what the flags above bound (benchmarks/RESULTS.md, session 45):
# Java's own besides its heap and direct memory (metaspace, code, threads, GC, glibc's arenas: NMT counted ~60 MiB,
# its RSS under a flood up to ~100 MiB more than that and its heap and direct memory in use);
JAVA_OWN_MIB = 128
# what a worker's memory grows by from idle while it answers or refuses batches of the largest bodies (+160 MiB
# at the peak);
WORKER_GROWTH_MIB = 192
# KServe's TorchServe wrapper, a Python process with kserve imported (126 MiB resident here).
KSERVE_WRAPPER_MIB = 160


def java_ceiling_mib(props: dict[str, str]) -> float:
    """The most memory TorchServe's Java may hold: its heap and direct memory full, and its own."""
    vmargs = props["vmargs"]
    return jvm_flag_mib(vmargs, "-Xmx") + jvm_flag_mib(vmargs, "-XX:MaxDirectMemorySize=") + JAVA_OWN_MIB
