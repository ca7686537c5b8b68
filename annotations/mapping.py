"""Map annotation label names to label-space class ids."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MappingError
from .label_spaces import IGNORE_NAME, LabelSpace, normalize_name

_SUFFIX = re.compile(r"^(.*?)[-_]\d+$")


@dataclass
class LabelMapping:
    """Rules turning an annotation's label into a label-space name.

    Order: 1. ``names`` (exact, case- and whitespace-insensitive); 2. the label-space name itself;
    3. ``rules`` (regular expressions, first match wins, searched case-insensitively on the
    stripped label); 4. with ``strip_instance_suffix``, a trailing ``-N``/``_N`` is removed and
    1-2 are tried again. A target of ``__ignore__`` gives 255.
    """

    names: dict[str, str] = field(default_factory=dict)
    rules: list[tuple[re.Pattern, str]] = field(default_factory=list)
    strip_instance_suffix: bool = False

    def __post_init__(self) -> None:
        self.names = {normalize_name(k): str(v) for k, v in self.names.items()}

    @classmethod
    def from_dict(cls, data: Any, source: str = "<mapping>") -> LabelMapping:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise MappingError(f"{source}: mapping must be an object/dictionary")
        structured = any(k in data for k in ("map", "rules", "strip_instance_suffix"))
        names = (data.get("map") or {}) if structured else data
        if not isinstance(names, dict):
            raise MappingError(f"{source}: 'map' must be a dictionary of name: target")
        for k, v in names.items():
            if not isinstance(v, str):
                raise MappingError(f"{source}: target of {k!r} must be a string, got {v!r}")
        rules: list[tuple[re.Pattern, str]] = []
        raw_rules = (data.get("rules") or []) if structured else []
        if not isinstance(raw_rules, list):
            raise MappingError(f"{source}: 'rules' must be a list of {{pattern, to}}")
        for i, r in enumerate(raw_rules):
            if not (isinstance(r, dict) and isinstance(r.get("pattern"), str) and isinstance(r.get("to"), str)):
                raise MappingError(f"{source}: rule {i} must have string 'pattern' and 'to'")
            try:
                rules.append((re.compile(r["pattern"], re.IGNORECASE), r["to"]))
            except re.error as e:
                raise MappingError(f"{source}: rule {i}: bad regular expression {r['pattern']!r}: {e}") from e
        strip = bool(data.get("strip_instance_suffix", False)) if structured else False
        return cls(names={str(k): v for k, v in names.items()}, rules=rules, strip_instance_suffix=strip)

    @classmethod
    def coerce(cls, mapping: Any) -> LabelMapping:
        """A mapping from what callers pass: a LabelMapping, None (no mapping), a dict or a file path."""
        if isinstance(mapping, LabelMapping):
            return mapping
        if mapping is None:
            return cls()
        if isinstance(mapping, dict):
            return cls.from_dict(mapping)
        return cls.from_file(mapping)

    @classmethod
    def from_file(cls, path: str | Path) -> LabelMapping:
        """Read a YAML (``.yaml``/``.yml``, needs PyYAML) or JSON mapping file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise MappingError(f"{path}: cannot read mapping file: {e}") from e
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml  # optional dependency
            except ImportError as e:  # pragma: no cover
                raise MappingError(f"{path}: YAML mapping files need PyYAML (pip install pyyaml)") from e
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise MappingError(f"{path}: invalid YAML: {e}") from e
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise MappingError(f"{path}: invalid JSON: {e}") from e
        return cls.from_dict(data, str(path))

    def validate(self, space: LabelSpace) -> None:
        """Raise :class:`MappingError` if a target is not in ``space``."""
        targets = list(self.names.values()) + [t for _, t in self.rules]
        bad = sorted({t for t in targets if space.index_of(t) is None})
        if bad:
            raise MappingError(f"mapping targets not in label space {space.name!r}: {', '.join(map(repr, bad))}")

    def resolve(self, label: str, space: LabelSpace) -> int | None:
        """Class id (or ``space.ignore_index``) for ``label``; ``None`` if unknown."""
        idx = self._direct(label, space)
        if idx is not None:
            return idx
        text = label.strip()
        for pattern, target in self.rules:
            if pattern.search(text):
                return space.index_of(target)
        if self.strip_instance_suffix:
            m = _SUFFIX.match(text)
            if m:
                return self._direct(m.group(1), space)
        return None

    def _direct(self, label: str, space: LabelSpace) -> int | None:
        key = normalize_name(label)
        if key in self.names:
            return space.index_of(self.names[key])
        if key == IGNORE_NAME:
            return space.ignore_index
        return space.index_of(label)
