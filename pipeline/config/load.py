"""Load a config: a shipped preset or a YAML file, then --set overrides, then strict validation.

A YAML file may start from a preset with ``base: NAME``; its keys are merged over the
preset's, section by section. Every error is one line that names the file and the
dotted key path.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
# a key named secret, password, token or key, or with one of them as a word of its name (access_key,
# auth_token), not any name that contains the letters (model.n_storage_tokens is no secret)
SECRET_KEY = re.compile(r"(^|_)(secret|password|token|key)(_|$)", re.IGNORECASE)
MASK = "***"


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the file and key."""


def list_presets() -> dict[str, str]:
    """Preset name -> its one-line description (the YAML file's first comment line)."""
    out = {}
    for path in sorted(PRESETS_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        out[path.stem] = first.lstrip("# ").strip() if first.startswith("#") else ""
    return out


def _read_yaml(path: Path, label: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{label}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read: {exc.strerror or exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: the top level must be a mapping of sections, not {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _resolve(source: str, seen: tuple[str, ...] = ()) -> tuple[dict[str, Any], str, str]:
    """(raw dict, label for errors, config name) for a preset name or a YAML path."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in source:
        if not path.is_file():
            raise ConfigError(f"config file {source} does not exist")
        label, name = str(path), path.stem
    else:
        path = PRESETS_DIR / f"{source}.yaml"
        if not path.is_file():
            known = ", ".join(list_presets())
            raise ConfigError(f"unknown preset {source!r}; shipped presets: {known} (or give a path to a .yaml file)")
        label, name = f"preset {source}", source
    if label in seen:
        raise ConfigError(f"{label}: 'base' chain loops back to itself")
    data = _read_yaml(path, label)
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{label}: base: must be a preset name or a path")
        base_path = Path(base)
        if not base_path.is_absolute() and (path.parent / base).suffix in (".yaml", ".yml"):
            base = str(path.parent / base)
        base_data, _, _ = _resolve(base, (*seen, label))
        base_data.pop("name")  # a config is named by itself (its name: key, else its file name), not its base
        data = _merge(base_data, data)
    data.setdefault("name", name)
    return data, label, name


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a', 'b', 'c'], typed value); the value is read as YAML (1, 0.5, true, [1, 2])."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY.PATH=VALUE")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"--set {text}: the key path is empty or has an empty part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_override(data: dict[str, Any], parts: list[str], value: Any, model: type[BaseModel]) -> None:
    """Set ``value`` at ``parts`` in the raw config, checking each key exists in the schema."""
    label = f"--set {'.'.join(parts)}={value}"
    node, cls = data, model
    for i, part in enumerate(parts):
        fields = cls.model_fields if cls is not None else None
        if fields is not None and part not in fields:
            raise ConfigError(f"{label}: unknown key {'.'.join(parts[: i + 1])!r}")
        if i == len(parts) - 1:
            node[part] = value
            return
        annotation = fields[part].annotation if fields is not None else None
        cls = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None or cls is not None else child
            if not isinstance(child, dict):
                raise ConfigError(f"{label}: {'.'.join(parts[: i + 1])} is not a section")
            node[part] = child
        node = child


# The loc entry pydantic adds for each member of a union (``int | Literal["auto"]``).
_UNION_MEMBER = re.compile(r"int|float|str|bool|constrained-\w+|literal\[.*\]")
_SHOULD = "Input should be "


def _format_validation(exc: ValidationError, label: str) -> str:
    """One line: each failing key, what it should be and what it got. A value that fits no
    member of a union gets one entry naming every member's rule."""
    problems: dict[str, tuple[list[str], str]] = {}  # path -> (rules, " (got ...)")
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        while len(loc) > 1 and _UNION_MEMBER.fullmatch(loc[-1]):
            loc.pop()
        path = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            problems[path] = (["unknown key"], "")
        else:
            problems.setdefault(path, ([], f" (got {err.get('input')!r})"))[0].append(err["msg"])

    def rule(rules: list[str]) -> str:
        if len(rules) > 1 and all(r.startswith(_SHOULD) for r in rules):
            return _SHOULD + " or ".join(r.removeprefix(_SHOULD) for r in rules)
        return " or ".join(rules)

    return f"{label}: " + "; ".join(f"{path}: {rule(rules)}{got}" for path, (rules, got) in problems.items())


def validate(data: dict[str, Any], model: type[BaseModel], label: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, label)) from None


def load_config(source: str | None, overrides: list[str] | tuple[str, ...] = (), *, model: type[BaseModel],
                default: str = "local") -> BaseModel:
    """The validated config from a preset name or YAML path (None: ``default``) with ``--set`` overrides."""
    data, label, _ = _resolve(source or default)
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(data, parts, value, model)
    if overrides:
        label += " with --set " + " ".join(overrides)
    return validate(data, model, label)


def load_config_file(path: str, text: str, *, model: type[BaseModel]) -> BaseModel:
    """A config saved in a run directory; masked secrets come back as unset (the environment fills them)."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return validate(_unmask(data), model, path)


def _unmask(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: (None if v == MASK else _unmask(v)) for k, v in data.items()}
    return data


def _masked(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: (MASK if SECRET_KEY.search(k) and v not in (None, "") and not isinstance(v, dict)
                    else _masked(v)) for k, v in data.items()}
    return data


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML, secrets masked."""
    return yaml.safe_dump(_masked(config.model_dump(mode="json")), sort_keys=False)


def flatten_config(config: BaseModel) -> dict[str, str]:
    """'section.key' -> value string for MLflow params, secrets masked."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            out[prefix] = str(node)

    walk("", _masked(config.model_dump(mode="json")))
    return out
