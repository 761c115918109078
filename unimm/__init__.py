"""unimm: one transformer that reads and writes text and images, trained from a CPU to a pod."""

__version__ = "0.1.0"
