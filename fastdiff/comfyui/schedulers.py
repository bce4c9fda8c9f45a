"""ComfyUI-compatible sigma schedules (SCHEDULER_NAMES, calculate_sigmas)."""

__all__: list[str] = []
