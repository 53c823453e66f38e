"""Serve the `moe-tuning` deployments from this process (`python -m flows.serve`).

Then `prefect deployment run moe-tuning/full` (or stage3 / evaluate, with -p parameters) runs
them here. For work pools (a GPU host, Docker, Kubernetes) use flows/prefect.yaml instead.
"""

from __future__ import annotations

from prefect import serve

from flows.moe_tuning import moe_tuning

DEPLOYMENTS = {
    "full": "data, stages 1-3, evaluation of stages 2 and 3, registration with the promotion gate",
    "stage3": "upcycle and MoE-tune from init_from (a stage-2 export or an MoE checkpoint), evaluate, register",
    "evaluate": "evaluate model (a folder or a models:/ URI) on POPE and VQA",
    "benchmark": "the paper's benchmark table of model through lmms-eval (tasks: paper, shapesworld, names)",
}


def deployments():
    return [
        moe_tuning.to_deployment(name=name, parameters={"pipeline": name}, description=text)
        for name, text in DEPLOYMENTS.items()
    ]


if __name__ == "__main__":
    serve(*deployments())
