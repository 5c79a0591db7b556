"""A model's config.yaml: endpoints, taps, batching. Every key optional (SPEC)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.errors import ConfigError

NAME_PATTERN = r"^[A-Za-z0-9_-]+$"


class _Strict(BaseModel):
    # A misspelt key must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid")


class EndpointConfig(_Strict):
    inputs: list[str] = Field(min_length=1, description="Model input names or tap names.")
    outputs: list[str] = Field(min_length=1, description="Model output names or tap names.")


class BatchingConfig(_Strict):
    max_batch_size: int | None = Field(None, ge=1)
    max_queue_delay_ms: float | None = Field(None, ge=0)
    max_queue_size: int | None = Field(None, ge=1)
    shared_passes: bool = Field(
        True, description="Batch requests to different endpoints/taps in one forward pass.")


class ModelConfig(_Strict):
    endpoints: dict[str, EndpointConfig] = Field(default_factory=dict)
    default_endpoint: str | None = None
    taps: bool = True
    version: int | None = Field(None, ge=1, description="Serve this version, not the highest.")
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    allow_lambda: bool = Field(
        False, description="Load Lambda layers (runs code stored in the model file).")
    jit_compile: bool = Field(False, description="Compile with XLA (pads batches to sizes).")

    @field_validator("endpoints")
    @classmethod
    def _endpoint_names(cls, endpoints: dict[str, EndpointConfig]) -> dict[str, EndpointConfig]:
        bad = [n for n in endpoints if not re.match(NAME_PATTERN, n)]
        if bad:
            raise ValueError(f"endpoint names must match {NAME_PATTERN}: {bad}")
        return endpoints


def load_config(path: Path) -> ModelConfig:
    """Parse a config.yaml; a missing file means every default."""
    if not path.exists():
        return ModelConfig()
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return ModelConfig.model_validate(data)
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
