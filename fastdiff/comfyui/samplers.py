"""ComfyUI-compatible samplers (`sample_<name>`, SAMPLER_NAMES)."""

__all__: list[str] = []
