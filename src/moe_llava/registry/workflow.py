"""Register a pipeline's model: log the pyfunc model in an MLflow run, create the version, apply the gate.

The single implementation behind ``moe-llava registry register`` and the pipeline's registry step.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moe_llava.errors import UserError
from moe_llava.registry.gate import load_metrics
from moe_llava.registry.model import log_pyfunc_model, resolve_export_dir
from moe_llava.registry.registry import ModelRegistry, RegistrationResult
from moe_llava.registry.settings import RegistrySettings


def register_export(
    model_dir: str | Path,
    metrics: Mapping[str, Any] | str | Path,
    *,
    settings: RegistrySettings | None = None,
    config: Mapping[str, Any] | str | Path | None = None,
    run_id: str | None = None,
    apply_gate: bool = True,
) -> RegistrationResult:
    """Log ``model_dir`` (a stage export) as the pyfunc model and register it as a new version.

    ``metrics``: the evaluation's metrics (dict or ``metrics.json`` path, flat keys such as
    ``pope/mean_f1``). ``config``: the pipeline's config (mapping, YAML file or YAML text); when
    omitted and ``run_id`` is a stage run, the run's ``config.yaml`` artifact is used.
    ``run_id``: log into this run (e.g. stage 3's); otherwise the active run, otherwise a new run
    named ``register`` in ``settings.experiment_name`` (nested under ``$MOE_LLAVA_PARENT_RUN_ID``).
    """
    import mlflow

    from moe_llava.tracking import PROVENANCE_KEYS, TrackedRun, provenance_tags, resolve_parent

    settings = settings or RegistrySettings()
    export_dir = resolve_export_dir(model_dir)
    metrics = load_metrics(metrics)
    uri = settings.resolved_tracking_uri()
    mlflow.set_tracking_uri(uri)

    active = mlflow.active_run()
    if active is not None and run_id in (None, active.info.run_id):
        run_context: Any = contextlib.nullcontext(active)  # the caller's run: the caller ends it
    elif run_id is not None:
        if active is not None:
            raise UserError(f"run {active.info.run_id} is active; cannot log into run {run_id} as well")
        run_context = TrackedRun.start(uri=uri, resume_run_id=run_id)
    else:
        run_context = TrackedRun.start(
            run_name="register",
            experiment_name=settings.experiment_name,
            logger_cfg=settings.logger,
            uri=uri,
            parent_run_id=resolve_parent(),
        )

    with run_context:
        run_id = mlflow.active_run().info.run_id
        run_tags = mlflow.get_run(run_id).data.tags
        config_text = _config_text(config, run_id)
        mlflow.log_dict(dict(metrics), "registry/metrics.json")
        if config_text:
            mlflow.log_text(config_text, "registry/config.yaml")
        model_info = log_pyfunc_model(export_dir, pyfunc_config=settings.pyfunc)
        tags = {  # what a person reads on the version page; metrics go on the logged model
            "stage": run_tags.get("stage") or _config_value(config_text, "stage", "name"),
            "recipe": _config_value(config_text, "experiment_name"),
            "moe": run_tags.get("moe") or _moe_summary(export_dir),
            **provenance_tags(inherited=run_tags),
        }
        registry = ModelRegistry(settings.model_name, settings.gate, tracking_uri=uri)
        result = registry.register(
            model_info.model_uri, metrics, run_id=run_id, tags=tags, apply_gate=apply_gate
        )
        provenance = {k: tags[k] for k in PROVENANCE_KEYS if tags[k]}
        mlflow.set_tags(
            {
                **provenance,  # the run says what the version was built from, as the version does
                "source_export": str(export_dir.resolve()),
                "registered_model": settings.model_name,
                "registered_version": result.version,
                "gate_decision": "champion" if result.decision.promote else "challenger",
            }
        )
    return result


def _config_value(config_text: str | None, *keys: str) -> str | None:
    """``config[keys[0]][keys[1]]...`` of the YAML config (e.g. ``experiment_name``: the recipe), if set."""
    import yaml

    try:
        value: Any = yaml.safe_load(config_text or "")
    except yaml.YAMLError:
        return None
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return None if value is None or isinstance(value, dict) else str(value)


def _moe_summary(export_dir: Path) -> str:
    """The export's MoE settings as JSON, or ``dense``: the ``moe`` tag of the training runs."""
    moe = json.loads((export_dir / "config.json").read_text()).get("moe")
    return json.dumps(moe) if moe else "dense"


def _config_text(config: Mapping[str, Any] | str | Path | None, run_id: str) -> str | None:
    import yaml

    if config is None:
        import mlflow

        try:  # a stage run logged its resolved config as config.yaml
            return mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
        except Exception:
            return None
    if isinstance(config, Mapping) or hasattr(config, "items"):
        from omegaconf import OmegaConf

        if OmegaConf.is_config(config):
            return OmegaConf.to_yaml(config)
        return yaml.safe_dump(json.loads(json.dumps(dict(config), default=str)), sort_keys=False)
    path = Path(config)
    if isinstance(config, Path) or (len(str(config)) < 4096 and "\n" not in str(config)):
        if not path.is_file():
            raise UserError(f"config: {path} does not exist")
        return path.read_text()
    return str(config)
