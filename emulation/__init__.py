"""The emulated CXL machine (QEMU guest with a CPU-less slow memory node), its workloads and the demo; the simulator and traces are in tiermem."""
