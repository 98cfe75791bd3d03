"""tiermem: OS-level memory tiering for Linux hosts with a slow (CXL / remote NUMA) tier."""
__version__ = "0.1.0"
