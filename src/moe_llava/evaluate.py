"""Evaluate a stage's export:  python -m moe_llava.evaluate experiment=tiny_cpu stage=stage3 [overrides...]

POPE (random/popular/adversarial) and short-answer VQA from ``data.eval``, expert load by modality
for MoE models; settings in ``conf/evaluation/``; outputs in ``<run_dir>/<stage>/eval/`` and an
``eval-<stage>`` MLflow run. The same command serves ``moe-llava eval run ...``, DVC and Prefect.
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from moe_llava.paths import CONF_DIR

SUMMARY_KEYS = ("pope/mean_f1", "eval/num_questions", "eval/num_missing", "eval/wall_time_s")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from moe_llava.errors import user_errors
    from moe_llava.evaluation.runner import run_evaluation

    # a bad config, question file or image (file, line and field), a tracking server that is down
    with user_errors("moe-llava eval"):
        metrics = run_evaluation(cfg)
    shown = {k: v for k, v in metrics.items() if k in SUMMARY_KEYS or k.endswith(("/f1", "/accuracy"))}
    shown = {k: v for k, v in shown.items() if k.count("/") <= 2}  # not the per-category accuracies
    print(json.dumps(shown, indent=2))


if __name__ == "__main__":
    main()
