"""Platform support: CPU mode for megatron-core on CPU-only torch."""

from megatron_longvideo.platform.cpu import cpu_mode_enabled, enable_cpu_mode

__all__ = ["enable_cpu_mode", "cpu_mode_enabled"]
