"""Data pipeline: LLaVA-format manifests, validation, templates, datasets, ShapesWorld, DVC-tracked data.

Public API (import from the submodules; this package stays light to import):

* ``manifest``: ``iter_manifest``, ``iter_entries``, ``read_manifest``, ``write_manifest``, ``ManifestWriter``
* ``validation``: ``Validator``, ``validate_manifest``, ``ValidationReport``, ``Reason``
* ``prepare``: ``prepare_manifest``, ``PrepareResult``
* ``templates``: ``get_template``, ``TEMPLATES``, ``TokenizedSample``
* ``dataset``: ``LlavaDataset``; ``collator``: ``LlavaCollator``; ``sampler``: ``ModalityGroupedBatchSampler``
* ``loader``: ``build_dataloader``, ``build_collator``; ``config``: builders from the Hydra ``data`` group
* ``tokenizer``: ``train_bpe_tokenizer``, ``load_tokenizer``, ``ensure_image_token``
* ``shapesworld``: ``generate_shapesworld``, ``ShapesWorldConfig``
"""
