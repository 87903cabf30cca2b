"""The one error type for presets and attention_config.yaml values that cannot be used."""
from __future__ import annotations


class ConfigError(ValueError):
    """A preset or attention_config.yaml value that cannot be used.

    ``field`` is the dotted path of the value the user sees (``"Wan2.1_14b.attention_configs.fast
    .block_size.m"``, ``"warmup_steps"``; ``""`` when a whole file is at fault), ``reason`` says
    what was found and what is allowed, ``file`` and ``line`` (1-based) say where it was read
    when known. ``str()`` is ``"file (line N): field: reason"`` with the unknown parts left out,
    so an error shows verbatim in ComfyUI.
    """

    def __init__(self, reason: str, field: str = "", file: str | None = None, line: int | None = None):
        self.reason, self.field, self.file, self.line = reason, field, file, line
        super().__init__(self._text())

    def _text(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file} (line {self.line})" if self.line else str(self.file)
        parts = [p for p in (where, self.field, self.reason) if p]
        return ": ".join(parts)

    def located(self, file: str | None = None, line: int | None = None, prefix: str = "") -> "ConfigError":
        """The same error under ``prefix`` (a field path) and read from ``file`` at ``line``;
        what it already knows wins."""
        field = f"{prefix}.{self.field}" if prefix and self.field else (prefix or self.field)
        return ConfigError(self.reason, field, self.file or file, self.line or line)

    def __reduce__(self):
        return type(self), (self.reason, self.field, self.file, self.line)
