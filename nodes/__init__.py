"""ComfyUI-facing half of the pack: presets I/O, the preset editor rule, model patching, nodes."""
