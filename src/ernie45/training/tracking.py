"""Experiment trackers: what ``metrics.jsonl`` records, also logged to Weights & Biases or MLflow.

The recipe's ``wandb:`` and ``mlflow:`` sections (AutoModel's keys) each add a tracker; the
packages are optional extras (``pip install 'ernie45[wandb]'`` / ``'ernie45[mlflow]'``), and a
section set without its package is one error before anything is built. Only rank 0 logs. Each
tracker receives every metrics entry's numbers at the entry's ``step`` (``MetricsLogger.log``),
and the resolved recipe as the run's config.

  * wandb: ``mode: offline`` writes the run under ``dir`` (default OUTPUT_DIR/wandb) for a later
    ``wandb sync``; ``online`` needs a login; ``disabled`` logs nothing.
  * mlflow: ``tracking_uri`` defaults to a local store in the output directory: the SQLite file
    OUTPUT_DIR/mlflow.db, artifacts in OUTPUT_DIR/mlartifacts (``mlflow ui --backend-store-uri
    sqlite:///OUTPUT_DIR/mlflow.db`` shows it). NOTE: not MLflow's ./mlruns file store, which
    MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE=true.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Protocol

from .config import ConfigError, MLflowConfig, RecipeConfig, WandbConfig


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def require(package: str) -> ModuleType:
    """The tracker's package, or the one-line error that says how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(
            f"the recipe's `{package}:` section needs the {package} package, which is not installed: "
            f"pip install 'ernie45[{package}]' (or pip install {package}), or remove the section"
        ) from None


def enabled_sections(config: RecipeConfig) -> dict[str, WandbConfig | MLflowConfig]:
    """{package: section} of the trackers the recipe turns on."""
    sections = {"wandb": config.wandb if config.wandb is not None and config.wandb.enable else None, "mlflow": config.mlflow}
    return {name: section for name, section in sections.items() if section is not None}


def check_trackers(config: RecipeConfig) -> None:
    """Refuse, before anything is built, a tracker section whose package is missing."""
    for package in enabled_sections(config):
        require(package)


class WandbTracker:
    def __init__(self, section: WandbConfig, output_dir: Path, run_config: dict):
        wandb = require("wandb")
        directory = Path(section.dir) if section.dir else output_dir
        directory.mkdir(parents=True, exist_ok=True)  # NOTE: wandb.init refuses a dir that does not exist
        self.run = wandb.init(
            project=section.project,
            entity=section.entity,
            name=section.name or output_dir.name,
            group=section.group,
            tags=section.tags or None,
            notes=section.notes,
            mode=section.mode,
            dir=str(directory),
            config=run_config,
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowTracker:
    def __init__(self, section: MLflowConfig, output_dir: Path, run_config: dict):
        self.mlflow = mlflow = require("mlflow")
        local = section.tracking_uri is None
        output_dir = output_dir.resolve()
        mlflow.set_tracking_uri(f"sqlite:///{output_dir / 'mlflow.db'}" if local else section.tracking_uri)
        artifacts = section.artifact_location or ((output_dir / "mlartifacts").as_uri() if local else None)
        experiment = mlflow.get_experiment_by_name(section.experiment_name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else mlflow.create_experiment(section.experiment_name, artifact_location=artifacts)
        )
        tags = {**section.tags, **({"mlflow.note.content": section.description} if section.description else {})}
        self.run = mlflow.start_run(experiment_id=experiment_id, run_name=section.run_name or output_dir.name, tags=tags)
        mlflow.log_dict(run_config, "config.yaml")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


TRACKERS = {"wandb": WandbTracker, "mlflow": MLflowTracker}


def build_trackers(config: RecipeConfig, output_dir: Path, run_config: dict) -> list[Tracker]:
    """One started tracker per enabled section (call on rank 0 only)."""
    return [TRACKERS[package](section, output_dir, run_config) for package, section in enabled_sections(config).items()]
