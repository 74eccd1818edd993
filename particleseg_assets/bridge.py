"""The bridge between the library's step functions and Dagster: launchpad config classes made
from the library's options dataclasses (so the two cannot drift), and a step's summary turned
into asset metadata.

Every launchpad field has a description: Dagster shows a pydantic field's ``description`` and
nothing else (attribute docstrings are not read), so :class:`LaunchpadConfig` (the base of
every config class here) has pydantic turn each field's docstring into its description, and
:func:`launchpad_config` gives the fields it copies the docstrings of the dataclass's fields
(:func:`field_docs`)."""

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path

import pydantic
from dagster import AssetCheckResult, AssetCheckSeverity, Config, MetadataValue

__all__ = [
    "PATH_KEYS",
    "LaunchpadConfig",
    "check_result",
    "field_docs",
    "launchpad_config",
    "metadata",
    "options_from",
]


class LaunchpadConfig(Config):
    """A Dagster config class whose field docstrings are the launchpad's descriptions."""

    model_config = pydantic.ConfigDict(use_attribute_docstrings=True)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each annotated field of a class (a dataclass), by field name; one
    paragraph, white space collapsed."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for statement, after in zip(body, body[1:], strict=False):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[statement.target.id] = " ".join(after.value.value.split())
    return docs


PATH_KEYS = frozenset({"particles_star", "mask", "corpus"})
"""Summary keys whose values are shown as paths (the corpus may be a URL)."""
IMAGE_SUFFIX = ".png"


def launchpad_config(options: type, module: str) -> type[Config]:
    """The launchpad config class of an options dataclass: the same fields, types and
    defaults (documented on the dataclass); ``FooOptions`` gives ``FooConfig``, defined in
    ``module`` (the assets' module, as if written there)."""
    hints = typing.get_type_hints(options)
    fields = dataclasses.fields(options)
    docs = field_docs(options)

    def body(namespace: dict[str, typing.Any]) -> None:
        namespace["__module__"] = module
        namespace["__annotations__"] = {f.name: hints[f.name] for f in fields}
        namespace.update(
            {
                f.name: pydantic.Field(default=f.default, description=docs.get(f.name))
                for f in fields
            }
        )

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
