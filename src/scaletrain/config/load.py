"""Reading a config: defaults, then a TOML/JSON/YAML file, then `--ds`, then `key=value` overrides;
validation errors as one line naming the key (with the closest valid key for a typo); the resolved
config written back as TOML. Imports no torch. Imports: `scaletrain.config.schema`, `scaletrain.errors`.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ValidationError,
)

from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def valid_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted key path of the tree, sections included (`train`, `train.max_steps`, ...)."""
    keys = []
    for name, field in model.model_fields.items():
        spelled = field.alias or name
        path = f"{prefix}{spelled}"
        keys.append(path)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(valid_keys(ann, path + "."))
    return keys


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.6)
    if not close:  # try the last part alone: `lr` -> `optim.lr`
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in valid_keys() if k.rsplit(".", 1)[-1] == leaf][:1]
    return f"; did you mean '{close[0]}'?" if close else "; see `scaletrain config show`"


def parse_value(text: str) -> Any:
    """An override's value: JSON where it parses (numbers, true/false, null, lists), else the string."""
    lowered = text.strip()
    if lowered in ("True", "False", "None"):  # Python spellings are common on command lines
        lowered = {"True": "true", "False": "false", "None": "null"}[lowered]
    try:
        return json.loads(lowered)
    except json.JSONDecodeError:
        return text


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None or isinstance(child, str) else child
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`["optim.lr=3e-4", "backend=fsdp"]` -> a nested dict. `backend=X` means `backend.kind=X`."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=3e-4")
        if key in {"backend", "backend.kind"}:
            key = "backend.kind"
        value = parse_value(raw)
        if key == "backend.kind" and isinstance(value, str):
            value = value.lower()
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def read_config_file(path: Path) -> dict[str, Any]:
    """TOML, JSON or YAML (if PyYAML is installed) into a plain dict."""
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found; pass an existing --config file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text()
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as e:
                raise ConfigError(f"config file {path}: YAML needs `pip install pyyaml` (or use TOML)") from e
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path}: unknown extension {suffix!r}; use .toml, .json or .yaml")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: cannot parse: {' '.join(str(e).split())}") from e
    except Exception as e:
        if type(e).__module__.startswith("yaml"):
            raise ConfigError(f"config file {path}: cannot parse: {' '.join(str(e).split())}") from e
        raise
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a table of sections")
    # `backend = "fsdp"` in a file is the same shorthand as on the command line.
    if isinstance(data.get("backend"), str):
        data["backend"] = {"kind": data["backend"].lower()}
    return data


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-after"))
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"config: unknown key '{loc}'{_suggest(loc)}"
    msg = first["msg"].removeprefix("Value error, ")
    if "input" in first and kind not in ("value_error",) and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    if kind == "literal_error" and "expected" in first.get("ctx", {}):
        msg = f"must be one of {first['ctx']['expected']} (got {first['input']!r})"
    where = f"'{loc}': " if loc else ""
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"config: {where}{msg}{more}"


def build_config(tree: Mapping[str, Any]) -> Config:
    try:
        return Config.model_validate(dict(tree))
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def load_config(
    path: Path | None = None, overrides: Iterable[str] = (), ds_config: Path | None = None
) -> Config:
    """Defaults, then the file, then `--ds`, then overrides (later wins)."""
    tree: dict[str, Any] = read_config_file(Path(path)) if path else {}
    if ds_config is not None:
        tree = _merge(tree, {"backend": {"kind": "deepspeed", "deepspeed": {"config": str(ds_config)}}})
    return build_config(_merge(tree, parse_overrides(overrides)))


def config_to_toml(cfg: Config) -> str:
    """The resolved config as TOML, the format users write (no TOML writer in the standard library)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return json.dumps(str(v))

    lines: list[str] = []

    def section(name: str, data: dict[str, Any]) -> None:
        scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
        if scalars or not name:
            if name:
                lines.append(f"\n[{name}]")
            lines.extend(f"{k} = {fmt(v)}" for k, v in scalars.items() if v is not None)
        for k, v in data.items():
            if isinstance(v, dict):
                section(f"{name}.{k}" if name else k, v)

    section("", cfg.to_json_dict())
    return "\n".join(lines).lstrip() + "\n"
