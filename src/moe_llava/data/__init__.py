"""Data pipeline: LLaVA-format manifests, validation, templates, datasets, ShapesWorld, DVC-tracked data.

Modules: ``manifest`` (read/write LLaVA JSON and JSON Lines), ``conversation`` (the turn rules of
a record's ``conversations``), ``validation`` (record checks), ``prepare`` (validated manifests for
a stage), ``templates`` (conversation templates), ``dataset``, ``collator``, ``sampler``, ``loader``
(the training batches), ``config`` (builders from the Hydra ``data`` group), ``tokenizer`` (the BPE
tokenizer), ``images``, ``cli`` (``moe-llava data``) and the ``shapesworld`` package. Errors: :mod:`moe_llava.errors`.
"""

from moe_llava._lazy import lazy_exports

_EXPORTS = {
    "iter_manifest": "moe_llava.data.manifest",
    "iter_entries": "moe_llava.data.manifest",
    "read_manifest": "moe_llava.data.manifest",
    "write_manifest": "moe_llava.data.manifest",
    "ManifestWriter": "moe_llava.data.manifest",
    "Validator": "moe_llava.data.validation",
    "validate_manifest": "moe_llava.data.validation",
    "ValidationReport": "moe_llava.data.validation",
    "Reason": "moe_llava.data.validation",
    "prepare_manifest": "moe_llava.data.prepare",
    "PrepareResult": "moe_llava.data.prepare",
    "get_template": "moe_llava.data.templates",
    "TEMPLATES": "moe_llava.data.templates",
    "TokenizedSample": "moe_llava.data.templates",
    "LlavaDataset": "moe_llava.data.dataset",
    "LlavaCollator": "moe_llava.data.collator",
    "ModalityGroupedBatchSampler": "moe_llava.data.sampler",
    "build_dataloader": "moe_llava.data.loader",
    "build_collator": "moe_llava.data.loader",
    "stage_config": "moe_llava.data.config",
    "tokenizer_from_config": "moe_llava.data.config",
    "validator_from_config": "moe_llava.data.config",
    "prepare_stage": "moe_llava.data.config",
    "dataset_from_config": "moe_llava.data.config",
    "eval_dataset_from_config": "moe_llava.data.config",
    "train_bpe_tokenizer": "moe_llava.data.tokenizer",
    "load_tokenizer": "moe_llava.data.tokenizer",
    "ensure_image_token": "moe_llava.data.tokenizer",
    "generate_shapesworld": "moe_llava.data.shapesworld",
    "ShapesWorldConfig": "moe_llava.data.shapesworld",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
