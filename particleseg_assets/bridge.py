"""The bridge between the library's step functions and Dagster: launchpad config classes made
from the library's options dataclasses (so the two cannot drift), and a step's summary turned
into asset metadata."""

import dataclasses
import types
import typing
from pathlib import Path

from dagster import AssetCheckResult, AssetCheckSeverity, Config, MetadataValue

__all__ = ["PATH_KEYS", "check_result", "launchpad_config", "metadata", "options_from"]

PATH_KEYS = frozenset({"particles_star", "mask", "corpus"})
"""Summary keys whose values are shown as paths (the corpus may be a URL)."""
IMAGE_SUFFIX = ".png"


def launchpad_config(options: type, module: str) -> type[Config]:
    """The launchpad config class of an options dataclass: the same fields, types and
    defaults (documented on the dataclass); ``FooOptions`` gives ``FooConfig``, defined in
    ``module`` (the assets' module, as if written there)."""
    hints = typing.get_type_hints(options)
    fields = dataclasses.fields(options)

    def body(namespace: dict[str, typing.Any]) -> None:
        namespace["__module__"] = module
        namespace["__annotations__"] = {f.name: hints[f.name] for f in fields}
        namespace.update({f.name: f.default for f in fields})

    name = options.__name__.removesuffix("Options") + "Config"
    return types.new_class(name, (Config,), exec_body=body)


def options_from(options: type, config: Config) -> typing.Any:
    """The options dataclass ``options`` with the values of the launchpad ``config``."""
    return options(**config.model_dump())


def metadata(summary: dict[str, typing.Any]) -> dict[str, typing.Any]:
    """A step's summary as asset metadata, in its order: a PNG inline (a gallery), the
    :data:`PATH_KEYS` as paths, dicts as JSON, other values as they are."""
    from particleseg_model.figures import markdown_image

    out = {}
    for key, value in summary.items():
        if isinstance(value, Path) and value.suffix == IMAGE_SUFFIX:
            value = MetadataValue.md(markdown_image(value, value.stem))
        elif key in PATH_KEYS:
            value = MetadataValue.path(str(value))
        elif isinstance(value, dict):
            value = MetadataValue.json(value)
        out[key] = value
    return out


def check_result(
    name: str,
    check: typing.Any,
    severity: AssetCheckSeverity = AssetCheckSeverity.ERROR,
    **extra: typing.Any,
) -> AssetCheckResult:
    """The asset check ``name`` from a library check value (``passed`` and ``summary()``):
    ``extra`` metadata first, then the summary."""
    return AssetCheckResult(
        check_name=name,
        passed=check.passed,
        severity=severity,
        metadata={**extra, **check.summary()},
    )
