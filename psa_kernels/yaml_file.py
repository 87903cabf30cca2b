"""Reading a presets YAML file that may be hostile: any size, encoding, nesting or aliases.

A presets file is user input. Before anything builds Python objects from it, the file's size,
its nesting and the size of its expanded alias graph are bounded, so a "billion laughs" file
or twenty thousand nested brackets are refused by name instead of exhausting memory or the
stack. Scalars that Python cannot hold (a 5,000-digit integer, an impossible date) stay the
text the user wrote, so the field they sit in is refused by the config validation, naming that
field, and the rest of the file still loads. Every field's line is kept for error messages.
"""
from __future__ import annotations

import codecs
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.reader import ReaderError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import ConfigError

MAX_FILE_BYTES = 1 << 20     # a presets file of a thousand presets is about 600 kB
MAX_DEPTH = 32               # a preset is 6 levels deep in its file
MAX_VALUES = 200_000         # keys, values and list items, every alias counted where it is used
MAX_INT_DIGITS = 40          # beyond this no config number is valid, and Python refuses to print them

# UTF-32 first: its little-endian mark starts with UTF-16's.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_INT_TAG = "tag:yaml.org,2002:int"


@dataclass
class YamlDocument:
    """One parsed file: its data, the line of every field, and what was read with losses."""
    data: Any
    source: str = ""
    lines: dict[str, int] = field(default_factory=dict)   # "a.b[2].c" -> 1-based line
    lossy: list[ConfigError] = field(default_factory=list)  # e.g. bytes that were not UTF-8

    def line_of(self, path: str) -> int | None:
        """Line of ``path``, or of the nearest enclosing field the file has."""
        while path:
            if path in self.lines:
                return self.lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return None

    def locate(self, error: ConfigError) -> ConfigError:
        """``error`` with this file and the line of its field."""
        return error.located(file=self.source, line=error.line or self.line_of(error.field))


def _construct_scalar_or_text(constructor, node, deep):
    """An int past MAX_INT_DIGITS, or any scalar Python cannot build, stays the text written."""
    if node.tag == _INT_TAG and len(node.value) > MAX_INT_DIGITS:
        return node.value
    try:
        return yaml.SafeLoader.construct_object(constructor, node, deep)
    except Exception:  # noqa: BLE001 - whatever the scalar, the user's text is kept
        constructor.recursive_objects.pop(node, None)
        constructor.constructed_objects[node] = node.value
        return node.value


class _BoundedLoader(yaml.SafeLoader):
    """Pure-Python SafeLoader that bounds nesting while composing (its composer recurses)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(self.peek_event().start_mark, f"nested deeper than {MAX_DEPTH} levels; allowed: "
                                                             f"at most {MAX_DEPTH}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):
        if isinstance(node, ScalarNode):
            return _construct_scalar_or_text(self, node, deep)
        return super().construct_object(node, deep)


def _libyaml_bounds_nesting() -> bool:
    """libyaml 0.2.5 and later refuse nesting past 1000 levels while scanning, so its (recursive,
    compiled) composer never runs out of stack; _check_graph bounds the depth to MAX_DEPTH after."""
    try:
        from yaml import _yaml
        return bool(yaml.__with_libyaml__) and tuple(_yaml.get_version()) >= (0, 2, 5)
    except Exception:  # noqa: BLE001 - no compiled PyYAML: the pure-Python loader
        return False


if _libyaml_bounds_nesting():
    class _FastBoundedLoader(yaml.CSafeLoader):
        """libyaml's parser (an order of magnitude faster) with the scalar rule above."""

        def construct_object(self, node, deep=False):
            if isinstance(node, ScalarNode):
                return _construct_scalar_or_text(self, node, deep)
            return super().construct_object(node, deep)

    _LOADER = _FastBoundedLoader
else:
    _LOADER = _BoundedLoader


_TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels (aliases counted where used); allowed: at most {MAX_DEPTH}"


def _check_graph(root: Node) -> None:
    """Refuse loops, depth past MAX_DEPTH and more than MAX_VALUES values once aliases expand;
    linear in the nodes written, however often aliases repeat them."""
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    on_path: set[int] = set()

    def visit(node: Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            if depth + depths[key] > MAX_DEPTH:
                _refuse(node, _TOO_DEEP)
            return sizes[key], depths[key]
        if key in on_path:
            _refuse(node, "an alias refers to the collection that holds it (a loop); allowed: aliases "
                          "to values defined before and outside them")
        if depth > MAX_DEPTH:
            _refuse(node, _TOO_DEEP)
        children = []
        if isinstance(node, SequenceNode):
            children = node.value
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        on_path.add(key)
        size, height = 1, 1
        for child in children:
            s, h = visit(child, depth + 1)
            size, height = size + s, max(height, h + 1)
            if size > MAX_VALUES:
                _refuse(node, f"more than {MAX_VALUES} values once its aliases are expanded; allowed: at "
                              f"most {MAX_VALUES} (an alias counts as often as it is used)")
        on_path.discard(key)
        sizes[key], depths[key] = size, height
        return size, height

    visit(root, 1)


class _Refused(Exception):
    """A bound of this module was passed at ``mark``."""

    def __init__(self, mark, reason: str):
        super().__init__(reason)
        self.mark, self.reason = mark, reason


def _refuse(node: Node, reason: str) -> None:
    raise _Refused(node.start_mark, reason)


def _field_lines(root: Node) -> dict[str, int]:
    """Line of every mapping key and list item, by the dotted path the validation names."""
    lines: dict[str, int] = {}
    stack = [(root, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, MappingNode):
            for key, value in node.value:
                if isinstance(key, ScalarNode):
                    sub = f"{path}.{key.value}" if path else str(key.value)
                    lines.setdefault(sub, key.start_mark.line + 1)
                    stack.append((value, sub))
        elif isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                sub = f"{path}[{i}]"
                lines.setdefault(sub, item.start_mark.line + 1)
                stack.append((item, sub))
    return lines


def _yaml_error(e: yaml.YAMLError, text: str, source: str) -> ConfigError:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    line = column = None
    problem = getattr(e, "problem", None) or str(e)
    if mark is not None:
        line, column = mark.line + 1, mark.column + 1
    elif isinstance(e, ReaderError):  # a character YAML does not allow in a file
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        code = e.character if isinstance(e.character, int) else ord(e.character)
        problem = f"character U+{code:04X} is not allowed in YAML text; allowed: printable characters"
    at = f" (column {column})" if column else ""
    return ConfigError(f"malformed YAML: {problem}{at}", file=source, line=line)


def parse_yaml_text(text: str, source: str = "") -> YamlDocument:
    """Parse YAML text within the bounds above; ConfigError naming ``source`` and the line."""
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(f"{len(text)} characters; allowed: at most {MAX_FILE_BYTES}", file=source)
    loader = None
    try:
        loader = _LOADER(text)  # checks every character first: a ReaderError comes from here
        root = loader.get_single_node()
        if root is None:
            return YamlDocument(None, source)
        _check_graph(root)
        data = loader.construct_document(root)
        return YamlDocument(data, source, _field_lines(root))
    except _Refused as e:
        raise ConfigError(e.reason, file=source, line=e.mark.line + 1) from None
    except yaml.YAMLError as e:
        raise _yaml_error(e, text, source) from None
    finally:
        if loader is not None:
            loader.dispose()


def _encoding_by_nulls(raw: bytes) -> str:
    """Without a byte-order mark, YAML tells UTF-16/32 from UTF-8 by where the first character's
    zero bytes are (the first character of a YAML file is ASCII)."""
    head = raw[:4]
    if len(head) == 4 and head[:3] == b"\0\0\0" and head[3]:
        return "utf-32-be"
    if len(head) == 4 and head[0] and head[1:] == b"\0\0\0":
        return "utf-32-le"
    if len(head) >= 2 and not head[0] and head[1]:
        return "utf-16-be"
    if len(head) >= 2 and head[0] and not head[1]:
        return "utf-16-le"
    return "utf-8"


def decode_yaml_bytes(raw: bytes, source: str = "") -> tuple[str, list[ConfigError]]:
    """Text of a YAML file: UTF-8, or UTF-16/32 with a byte-order mark, as YAML allows. Bytes
    that do not decode are replaced (U+FFFD) and reported, so the rest of the file still loads."""
    encoding = next((enc for bom, enc in _BOMS if raw.startswith(bom)), None) or _encoding_by_nulls(raw)
    try:
        return raw.decode(encoding), []
    except UnicodeDecodeError as e:
        line = raw[:e.start].decode(encoding, errors="replace").count("\n") + 1
        name = encoding.upper().replace("-SIG", "")
        problem = ConfigError(f"not {name} text (byte 0x{raw[e.start]:02x}); "
                              f"allowed: a file saved as UTF-8. Read with the bad bytes replaced by U+FFFD",
                              file=source, line=line)
        return raw.decode(encoding, errors="replace"), [problem]


def read_file_bytes(path: Path, limit: int = MAX_FILE_BYTES) -> bytes | None:
    """The bytes of a regular file of at most ``limit`` bytes; None when it does not exist.

    A FIFO, device or directory at the path is refused without blocking on it."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}", file=str(path)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("not a regular file; allowed: a YAML file", file=str(path))
        if st.st_size > limit:
            raise ConfigError(f"{st.st_size} bytes; allowed: at most {limit} bytes", file=str(path))
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise ConfigError(f"more than {limit} bytes; allowed: at most {limit} bytes", file=str(path))
        return b"".join(chunks)
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}", file=str(path)) from None
    finally:
        os.close(fd)


def read_yaml_document(path: str | Path) -> YamlDocument | None:
    """Parsed YAML of a file (None when it does not exist), within the bounds above.

    Raises ConfigError with the file (and the line where known) when it cannot be used at all;
    problems it was read past are in ``lossy``."""
    path = Path(path)
    raw = read_file_bytes(path)
    if raw is None:
        return None
    text, lossy = decode_yaml_bytes(raw, str(path))
    doc = parse_yaml_text(text, str(path))
    doc.lossy = lossy
    return doc
