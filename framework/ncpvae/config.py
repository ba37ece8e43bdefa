"""Run configuration: pydantic models, TOML loading and ``--set`` overrides.

Component sections (``data``, ``model``, ``prior``, ``objective``, ``sampler``) are validated
against the plugin registry passed as validation context: the ``name`` key picks the plugin,
whose own ``Config`` class validates the rest. Nothing is rebuilt when plugins register.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from ncpvae.component import StrictModel
from ncpvae.defaults import DEFAULTS_FILE, shipped_default, tomllib
from ncpvae.errors import ConfigError, did_you_mean, format_validation_error
from ncpvae.evaluation.config import EvaluateConfig
from ncpvae.registry import Registry
from ncpvae.sections import (
    DatasetSection,
    LoggerSection,
    ModelSection,
    ObjectiveSection,
    PriorSection,
    SamplerSection,
    registry_from,
)


class TrainConfig(StrictModel):
    """Optimization of the VAE (the original notebook's epochs, learning rate and batch size)."""

    epochs: int = Field(10, ge=1, description="passes over the training set")
    batch_size: int = Field(64, ge=1, description="images per optimizer step: the global batch "
                            "(under torchrun each process takes a contiguous 1/N of it)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    steps_per_epoch: int | None = Field(
        None, ge=1, description="cap on optimizer steps per epoch (None: a full pass)"
    )
    grad_clip: float | None = Field(None, gt=0, description="max gradient norm (None: off)")
    eval_size: int = Field(2000, ge=1, description="test images used for per-epoch metrics")
    channels_last: bool = Field(
        False, description="keep the model's 4-D (conv) weights, and so its conv activations, in "
        "torch.channels_last layout: the same float32 arithmetic in another summation order "
        "(results not bit-identical to the default layout), 1.06-1.2x faster conv training on an "
        "x86 CPU (benchmarks/bench_training.py); no effect on models without conv layers"
    )
    fused_adam: bool = Field(
        False, description="torch's fused Adam kernel where this torch build has one for the "
        "device (CPU from torch 2.4, CUDA): the same float32 update in other rounding (another "
        "training trajectory), 1.02-1.13x the training speed at the default config"
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="arithmetic of the training step: fp32, or autocast to bf16 (CUDA, "
        "CPUs with bfloat16) or fp16 (CUDA, with a gradient scaler); weights, optimizer state, "
        "checkpoints and the summed losses stay float32 (docs/speed.md)"
    )


class SampleConfig(StrictModel):
    """The sampling stage after training (and prior fitting)."""

    num_samples: int = Field(64, ge=1, description="latents drawn per prior/sampler and decoded")


class LogConfig(StrictModel):
    """Experiment trackers fed alongside metrics.jsonl (the source of truth), e.g.
    ``backends = ["tensorboard", "mlflow"]``; each entry is a logger's name or its table
    (``{ name = "mlflow", tracking_uri = "..." }``). Their files go to ``<run>/logs/<name>/``
    unless a logger's config says otherwise."""

    backends: list[LoggerSection] = Field(  # type: ignore[valid-type]
        default_factory=list, description="logger plugins fed every metrics record, the config "
        "and the figures (none by default); `ncpvae list logger` shows them")


class RunConfig(StrictModel):
    """A whole run: which components, and how to train and sample them."""

    name: str = Field("default", min_length=1, description="run name (the run directory's name)")
    seed: int = Field(0, ge=0, description="seed for every random number of the run")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda if present")
    latent_dim: int = Field(10, ge=1, description="latent size D")
    data: DatasetSection = Field(default_factory=lambda: shipped_default("run", "data"))
    model: ModelSection = Field(default_factory=lambda: shipped_default("run", "model"))
    prior: PriorSection = Field(default_factory=lambda: shipped_default("run", "prior"))
    objective: ObjectiveSection = Field(default_factory=lambda: shipped_default("run", "objective"))
    sampler: SamplerSection | None = Field(
        None, description="sampler for the learned prior (None: the prior's own sampling)"
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    log: LogConfig = Field(default_factory=LogConfig)


# --------------------------------------------------------------------------------------------
# validation with readable errors


def validate_config(raw: Mapping[str, Any], registry: Registry | None = None,
                    what: str = "config") -> RunConfig:
    """Validate a raw config mapping; raise :class:`ConfigError` with a one-line message."""
    try:
        return RunConfig.model_validate(dict(raw), context={"registry": registry})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, what)) from None


# --------------------------------------------------------------------------------------------
# files and overrides


def builtin_config_names() -> list[str]:
    """Names of the configs shipped in ``ncpvae/configs`` (without ``.toml``)."""
    files = resources.files("ncpvae.configs").iterdir()
    return sorted(f.name.removesuffix(".toml") for f in files
                  if f.name.endswith(".toml") and f.name != DEFAULTS_FILE)


def read_toml(source: str | Path | None) -> dict[str, Any]:
    """Read a config: a file path, a built-in config name (``smoke``), or None for the default."""
    if source is None:
        source = "default"
    path = Path(source)
    if path.suffix != ".toml" and not path.exists():
        names = builtin_config_names()
        if str(source) not in names:
            raise ConfigError(
                f"no config file '{source}' and no built-in config of that name"
                f"{did_you_mean(str(source), names)}; built-in configs: {', '.join(names)}"
            )
        text = resources.files("ncpvae.configs").joinpath(f"{source}.toml").read_text()
        origin = f"built-in config '{source}'"
    else:
        if path.is_dir():
            raise ConfigError(f"config path '{path}' is a directory; give a .toml file")
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file '{path}' ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())})") from None
        origin = f"config file '{path}'"
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin} is not valid TOML: {exc}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and TOML-typed value (bare words are strings)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' must look like dotted.key=value")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides in order; returns a new dict.

    Swapping a component is one override: a bare name for a component table
    (``prior=gaussian``) or a new ``name`` (``prior.name=ncp``) replaces the whole table with
    that plugin's defaults, so fields of the old plugin do not leak into the new one.
    """
    result = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if isinstance(child, str):  # `prior = "ncp"` written as a bare name: expand it
                child = {"name": child}
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is a value, not a table")
            node[part] = child
            node = child
        last = path[-1]
        current = node.get(last)
        if len(path) > 1 and last == "name" and node.get("name") not in (None, value):
            node.clear()
        if isinstance(value, str) and isinstance(current, dict) and "name" in current:
            value = {"name": value}
        node[last] = value
    return result


def load_config(source: str | Path | None = None, overrides: Iterable[str] = (),
                registry: Registry | None = None) -> RunConfig:
    """Read, override and validate a run config."""
    raw = apply_overrides(read_toml(source), overrides)
    return validate_config(raw, registry)


# --------------------------------------------------------------------------------------------
# writing TOML (the resolved config saved with every run)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # a JSON string literal is a TOML basic string, once non-ASCII stays literal (TOML has
        # no surrogate-pair escapes) and DEL, which TOML forbids raw, is escaped
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return "{ " + items + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(data: Mapping[str, Any]) -> str:
    """Write nested plain data as TOML. ``None`` values are omitted (TOML has no null): every
    optional config field defaults to None, so omission round-trips."""
    lines: list[str] = []
    tables: list[tuple[list[str], Mapping[str, Any]]] = []

    def emit(prefix: list[str], table: Mapping[str, Any]) -> None:
        for key, value in table.items():
            if value is None:
                continue
            if isinstance(value, Mapping):
                tables.append((prefix + [key], value))
            else:
                lines.append(f"{key} = {_toml_value(value)}")

    emit([], data)
    while tables:
        path, table = tables.pop(0)
        lines.append("")
        lines.append(f"[{'.'.join(path)}]")
        nested_start = len(tables)
        emit(path, table)
        # keep depth-first order: sub-tables of this table come right after it
        tables[:] = tables[nested_start:] + tables[:nested_start]
    return "\n".join(lines).lstrip("\n") + "\n"


def config_to_toml(config: RunConfig) -> str:
    """The resolved config as TOML (defaults filled in)."""
    return to_toml(config.model_dump(mode="json"))


def run_config_schema(registry: Registry | None = None) -> dict[str, Any]:
    """JSON Schema of :class:`RunConfig` with each component section expanded to the configs
    of the installed plugins (``oneOf``, discriminated by ``name``)."""
    from ncpvae.kinds import KINDS

    registry = registry if registry is not None else registry_from(None)
    schema = RunConfig.model_json_schema()
    defs = schema.setdefault("$defs", {})
    section_of_kind = {"dataset": "data"}
    loggers = defs["LogConfig"]["properties"]["backends"]
    for kind in KINDS:
        variants = []
        for name in registry.names(kind):
            sub = registry.get(kind, name).Config.model_json_schema(ref_template="#/$defs/{model}")
            defs.update(sub.pop("$defs", {}))
            title = f"{kind}:{name}"
            defs[title] = sub
            variants.append({"$ref": f"#/$defs/{title}"})
        if kind == "logger":  # a list inside [log], not a section of its own
            loggers["items"] = {"oneOf": variants}
            continue
        section = section_of_kind.get(kind, kind)
        described = schema["properties"][section].get("description")
        schema["properties"][section] = {"oneOf": variants, "description": described
                                         or f"a {kind} plugin's config, chosen by 'name'"}
    return schema
