"""A model's config.yaml: endpoints, taps, batching, versions, code. Every key optional (SPEC)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from service.errors import ConfigError
from service.validation import describe

NAME_PATTERN = r"^[A-Za-z0-9_-]+$"
# A label stands where a version number does, so it starts with a letter.
LABEL_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]*$"


class _Strict(BaseModel):
    # A misspelt key must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid")


class EndpointConfig(_Strict):
    inputs: list[str] = Field(min_length=1, description="Model input names or tap names.")
    outputs: list[str] = Field(min_length=1, description="Model output names or tap names.")


class ExplainConfig(_Strict):
    """An endpoint that explains `output` instead of predicting (SPEC "Explanations")."""

    explain: Literal["gradient", "gradcam", "integrated_gradients"]
    output: str = Field(description="The output (or tap) of one score per class to explain.")
    input: str | None = Field(
        None, description="The model input to attribute to (gradient, integrated_gradients; "
        "default: the model's only input).")
    layer: str | None = Field(None, description="The layer (tap) Grad-CAM weighs (gradcam).")
    steps: int = Field(32, ge=1, le=256, description="Integrated gradients' Riemann steps.")

    @model_validator(mode="after")
    def _fits_kind(self) -> ExplainConfig:
        if self.explain == "gradcam":
            if self.layer is None:
                raise ValueError("gradcam needs `layer`: the layer (tap) whose activations "
                                 "it weighs")
            if self.input is not None:
                raise ValueError("gradcam explains a layer, not an input: drop `input`")
        elif self.layer is not None:
            raise ValueError(f"{self.explain} attributes to an input: drop `layer` (it is "
                             "for gradcam)")
        if "steps" in self.model_fields_set and self.explain != "integrated_gradients":
            raise ValueError("`steps` is for integrated_gradients only")
        return self


def _endpoint_kind(value: Any) -> str:
    explains = isinstance(value, ExplainConfig) or (isinstance(value, dict)
                                                    and "explain" in value)
    return "ExplainConfig" if explains else "EndpointConfig"


# `explain:` tells the two apart, so a bad entry gets only its own kind's errors (the tags
# are the class names: service.validation reports them without the tag).
AnyEndpointConfig = Annotated[
    Annotated[EndpointConfig, Tag("EndpointConfig")]
    | Annotated[ExplainConfig, Tag("ExplainConfig")],
    Discriminator(_endpoint_kind)]


class BatchingConfig(_Strict):
    max_batch_size: int | None = Field(None, ge=1)
    max_queue_delay_ms: float | None = Field(None, ge=0)
    max_queue_size: int | None = Field(None, ge=1)
    shared_passes: bool = Field(
        True, description="Batch requests to different endpoints/taps in one forward pass.")
    eager: bool | None = Field(
        None, description="An idle model starts a batch once as many requests wait as were "
        "in the server at once last time (max_queue_delay_ms only bounds the wait); false: "
        "always wait for a full batch or the delay.")
    dedup_rows: bool = Field(
        True, description="Compute rows with byte-identical inputs once per batch.")


class LatestPolicy(_Strict):
    latest: int = Field(ge=1, description="Serve the N highest versions.")


class SpecificPolicy(_Strict):
    specific: list[int] = Field(min_length=1, description="Serve exactly these versions.")

    @field_validator("specific")
    @classmethod
    def _positive(cls, versions: list[int]) -> list[int]:
        if any(v < 1 for v in versions):
            raise ValueError(f"versions are positive integers: {versions}")
        return versions


VersionPolicy = Literal["all"] | LatestPolicy | SpecificPolicy


class ModelConfig(_Strict):
    endpoints: dict[str, AnyEndpointConfig] = Field(default_factory=dict)
    default_endpoint: str | None = None
    taps: bool = True
    version: int | None = Field(None, ge=1, description="Short for {specific: [N]}.")
    version_policy: VersionPolicy = Field(
        default_factory=lambda: LatestPolicy(latest=1), description="Which versions serve.")
    labels: dict[str, int] = Field(
        default_factory=dict, description="Names that stand for a version number.")
    code: list[str] = Field(
        default_factory=list, description="Python files or packages in each version folder, "
        "imported before the model loads (needs --allow-model-code).")
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    allow_lambda: bool = Field(
        False, description="Load Lambda layers (runs code stored in the model file).")
    allow_file_ops: bool = Field(
        False, description="Serve a SavedModel whose graph holds file or system ops "
        "(ReadFile, WriteFile, PrintV2, ...): its signatures may touch the server's files.")
    jit_compile: bool = Field(False, description="Compile with XLA (pads batches to sizes).")

    @field_validator("endpoints")
    @classmethod
    def _endpoint_names(cls, endpoints: dict[str, EndpointConfig | ExplainConfig]
                        ) -> dict[str, EndpointConfig | ExplainConfig]:
        bad = [n for n in endpoints if not re.match(NAME_PATTERN, n)]
        if bad:
            raise ValueError(f"endpoint names must match {NAME_PATTERN}: {bad}")
        return endpoints

    @field_validator("labels")
    @classmethod
    def _label_names(cls, labels: dict[str, int]) -> dict[str, int]:
        bad = [n for n in labels if not re.match(LABEL_PATTERN, n)]
        if bad:
            raise ValueError(f"labels must match {LABEL_PATTERN}: {bad}")
        low = {n: v for n, v in labels.items() if v < 1}
        if low:
            raise ValueError(f"labels must name positive versions: {low}")
        return labels

    @field_validator("code")
    @classmethod
    def _code_inside_version(cls, code: list[str]) -> list[str]:
        for entry in code:
            path = PurePosixPath(entry)
            if path.is_absolute() or ".." in path.parts or not path.parts or not re.match(
                    r"^[A-Za-z_][A-Za-z0-9_]*$", path.parts[-1].removesuffix(".py")):
                raise ValueError(
                    f"code entry {entry!r} must be a .py file or package folder inside the "
                    "version folder, named as a Python module (no '..', not absolute)")
        return code

    @model_validator(mode="after")
    def _one_way_to_pick_versions(self) -> ModelConfig:
        if self.version is not None:
            if "version_policy" in self.model_fields_set:
                raise ValueError("set `version` or `version_policy`, not both")
            self.version_policy = SpecificPolicy(specific=[self.version])
        return self

    def select(self, versions: Iterable[int]) -> set[int]:
        """The versions the policy serves out of those available."""
        available = sorted(set(versions))
        policy = self.version_policy
        if policy == "all":
            return set(available)
        if isinstance(policy, LatestPolicy):
            return set(available[-policy.latest:])
        return set(available) & set(policy.specific)

    def load_key(self) -> str:
        """What a loaded version depends on: everything but the version picking and the
        labels, which apply without a reload."""
        return self.model_dump_json(exclude={"version", "version_policy", "labels"})


def load_config(path: Path) -> ModelConfig:
    """Parse a config.yaml; a missing file means every default."""
    if not path.exists():
        return ModelConfig()
    invalid = "its config.yaml is invalid"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:  # said without the snippet of the file YAML quotes
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML: "
                          f"{getattr(exc, 'problem', None) or type(exc).__name__}{where}",
                          category=invalid) from None
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:  # each problem where it is, without the values given
        problems = describe(exc, ModelConfig, lambda loc: ".".join(map(str, loc)))
        raise ConfigError(f"{path}: {problems}", category=invalid) from None
