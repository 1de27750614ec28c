"""Load a YAML config over the schema, apply dotted overrides, validate.

`load_config(path, overrides)` is the only way configs enter megaent. Every
failure becomes a `ConfigError` that names the key, the bad value, and the fix
(the closest valid key for typos); the CLI turns it into exit code 2.
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from megaent.config.errors import ConfigError
from megaent.config.schema import Config
from megaent.config.validate import validate


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        keys.append(name)
        ftype = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(ftype):
            keys.extend(_all_keys(ftype, name + "."))
    return keys


def _suggest(key: str) -> str:
    keys = _all_keys()
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    close = [by_leaf[leaf]] if leaf in by_leaf else []  # right leaf, wrong section
    close = close or difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:
        leaf_close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[leaf_close[0]]] if leaf_close else []
    return f"; did you mean `{close[0]}`?" if close else ""


def _error_from(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    if isinstance(exc, ConfigKeyError) or "not in struct" in str(exc) or "Key '" in str(exc):
        return ConfigError(f"{source}: unknown config key `{key}`{_suggest(key)}")
    if isinstance(exc, ValidationError):
        msg = str(exc).splitlines()[0]
        return ConfigError(f"{source}: `{key}`: {msg}")
    return ConfigError(f"{source}: {str(exc).splitlines()[0]}")


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override `{text}`: expected key=value, e.g. optimizer.lr=1e-6")
    key, _, raw = text.partition("=")
    key = key.strip()
    if raw == "":
        return key, ""
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]), resolve=False)["v"]  # `${...}` kept
    except Exception as exc:  # YAML syntax of the value
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"override `{text}`: the value is not valid YAML ({msg}); quote it, e.g. "
                          f"{key}='\"...\"'") from None
    return key, value


def _yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, DictConfig]]:
    """The YAML at `path` preceded by its `base:` chain (a path relative to the file), base first.

    `base:` lets a recipe override another without restating it (configs/*-clip-cov.yaml build on *-grpo.yaml).
    """
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base:` chain loops back to itself")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml syntax
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    if not loaded:  # an empty file would silently train on the schema defaults
        raise ConfigError(f"{path}: the file is empty; give at least one section (e.g. `trainer: {{steps: 10}}`)")
    base = loaded.pop("base", None)
    if base is None:
        return [(path, loaded)]
    base_path = (path.parent / str(base))
    if not base_path.is_file():
        raise ConfigError(f"{path}: base: {base} not found (looked for {base_path})")
    return _yaml_chain(base_path, seen + (path.resolve(),)) + [(path, loaded)]


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Schema defaults <- YAML file <- `key=value` overrides -> validated `Config`.

    Raises `ConfigError` for a missing file, unknown keys (with the closest
    valid key), ill-typed values and out-of-range values.
    """
    cfg: DictConfig = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass an existing YAML, e.g. configs/demo.yaml")
        for layer_path, layer in _yaml_chain(path):
            try:
                cfg = OmegaConf.merge(cfg, layer)
            except OmegaConfBaseException as exc:
                raise _error_from(exc, str(layer_path)) from None
    for text in overrides:
        key, value = _parse_override(text)
        try:
            OmegaConf.update(cfg, key, value, merge=True, force_add=False)
        except OmegaConfBaseException as exc:
            if not getattr(exc, "full_key", None):
                exc.full_key = key  # type: ignore[attr-defined]
            raise _error_from(exc, f"override `{text}`") from None
    return _to_config(cfg)


_UNRESOLVED = "_megaent_unresolved"  # instance attribute: {dotted key: (interpolation text, value it resolved to)}


def _interpolations(node: DictConfig, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key in node.keys():
        name = f"{prefix}{key}"
        if OmegaConf.is_interpolation(node, key):
            out[name] = node._get_node(key)._value()  # the `${...}` text itself
        elif isinstance(node._get_node(key), DictConfig):
            out.update(_interpolations(node[key], name + "."))
    return out


def _to_config(cfg: DictConfig) -> Config:
    """Resolve and validate; remember which keys were `${...}` interpolations, so that `to_yaml` writes them back
    unresolved (an `${oc.env:TOKEN}` must not land in clear in a run directory)."""
    exprs = _interpolations(cfg)
    try:
        obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        raise ConfigError(f"{key}={exprs.get(key, '?')}: {str(exc).splitlines()[0]}; set the variable or give a "
                          "default, e.g. ${oc.env:VAR,default}") from None
    validate(obj)
    resolved = {k: OmegaConf.select(OmegaConf.structured(obj), k) for k in exprs}
    setattr(obj, _UNRESOLVED, {k: (exprs[k], resolved[k]) for k in exprs})
    return obj


def to_yaml(cfg: Config) -> str:
    """The config as YAML (what a run directory's config.yaml holds): values as resolved, except that a key
    loaded from a `${...}` interpolation, and not changed since, keeps the interpolation text."""
    node = OmegaConf.structured(cfg)
    for key, (expr, value) in getattr(cfg, _UNRESOLVED, {}).items():
        if OmegaConf.select(node, key) == value:
            OmegaConf.update(node, key, expr, merge=False)
    return OmegaConf.to_yaml(node)


def unresolved(text: str, *, source: str) -> dict[str, Any]:
    """A config YAML as a plain dict, interpolations kept as text (to compare two copies of a run's config)."""
    try:
        loaded = OmegaConf.create(text)
    except Exception as exc:
        raise ConfigError(f"{source}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(loaded, DictConfig) or not loaded:
        raise ConfigError(f"{source}: empty or not a mapping of config sections")
    return OmegaConf.to_container(loaded, resolve=False)  # type: ignore[return-value]


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, docstring) for every leaf field, read from the schema source."""
    import ast
    import inspect

    out: list[tuple[str, str, str]] = []
    src = inspect.getsource(inspect.getmodule(cls))  # type: ignore[arg-type]
    tree = ast.parse(src)
    docs: dict[tuple[str, str], str] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            body = node.body
            for i, stmt in enumerate(body[:-1]):
                nxt = body[i + 1]
                if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                    docs[(node.name, stmt.target.id)] = str(nxt.value.value)  # type: ignore[union-attr]
    def walk(c: type, pre: str) -> None:
        for f in dataclasses.fields(c):
            sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(sub):
                walk(sub, pre + f.name + ".")
                continue
            owner = next(k.__name__ for k in c.__mro__ if (k.__name__, f.name) in docs) if any(
                (k.__name__, f.name) in docs for k in c.__mro__) else c.__name__
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
            out.append((pre + f.name, repr(default), docs.get((owner, f.name), "")))
    walk(cls, prefix)
    return out
