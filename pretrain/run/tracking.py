"""The recipe's logging section: where the scalars of metrics.jsonl are mirrored (kept apart from
config.py, which holds the other sections, to keep each module readable)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class LoggingConfig(BaseModel):
    """Where the scalars of metrics.jsonl are mirrored (metrics.jsonl itself is always written)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)

    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="trackers (the Hugging Face Trainer's name): tensorboard (RUN/tensorboard), wandb (follows "
        "WANDB_MODE: offline writes RUN/wandb for a later wandb sync; pip install .[wandb]) and mlflow (a file: "
        "store RUN/mlruns unless mlflow_tracking_uri or MLFLOW_TRACKING_URI says otherwise; pip install "
        ".[mlflow]); wandb and mlflow receive a step's scalars once a checkpoint at or after it is sealed (all "
        "at the end of the run), so a resume never logs a step twice",
    )
    project: str | None = Field(None, description="wandb project and MLflow experiment (default: the recipe's name)")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else file:RUN/mlruns)"
    )

    @field_validator("report_to")
    @classmethod
    def _no_repeats(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"a tracker is listed twice: {v}")
        return v
