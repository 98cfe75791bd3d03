"""The emulated CXL machine (QEMU guest with a CPU-less slow memory node), the tiered-memory simulator, workloads and traces."""
