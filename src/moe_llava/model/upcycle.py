"""Upcycling: turn the FFNs of chosen decoder layers of any `transformers` causal LM into MoE blocks.

One generic path for every decoder-only model whose layers hold their FFN as a child module
(``mlp`` for Llama, Qwen2, Phi, StableLM, Mistral, GPT-NeoX ...; ``feed_forward`` / ``ffn``
elsewhere). The layer's ``forward`` is untouched: only the child module is swapped.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from moe_llava.model.moe import SparseMoeBlock

FFN_ATTRIBUTE_NAMES = ("mlp", "feed_forward", "ffn")
LAYER_MODES = ("sparse", "first_half", "second_half", "dense")


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder layers of a causal LM (or of its base model)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    # Fallback for models that name it differently (`h`, `blocks`, ...): the module list whose
    # length is the configured layer count and whose items are all of one class.
    expected = getattr(_text_config(model), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and (expected is None or len(module) == expected)
            and len({type(m) for m in module}) == 1
        ):
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def find_ffn_name(layer: nn.Module) -> str:
    """Attribute name of a decoder layer's FFN child module."""
    for name in FFN_ATTRIBUTE_NAMES:
        if isinstance(getattr(layer, name, None), nn.Module):
            return name
    children = ", ".join(name for name, _ in layer.named_children())
    raise ValueError(
        f"{type(layer).__name__} has no recognisable FFN (looked for attributes {FFN_ATTRIBUTE_NAMES}; "
        f"its children are: {children})"
    )


def resolve_moe_layers(layers: str | Sequence[int], num_layers: int) -> list[int]:
    """Layer indices for a placement mode (`sparse`, `first_half`, `second_half`, `dense`) or an explicit list."""
    if isinstance(layers, str):
        if layers == "sparse":
            return list(range(0, num_layers, 2))
        if layers == "first_half":
            return list(range(num_layers // 2))
        if layers == "second_half":
            return list(range(num_layers // 2, num_layers))
        if layers == "dense":
            return list(range(num_layers))
        raise ValueError(
            f"unknown layers mode layers={layers!r}; expected one of {LAYER_MODES} or a list of indices"
        )
    indices = [int(i) for i in layers]
    if not indices:
        raise ValueError("layers is an empty list: name at least one decoder layer to upcycle")
    for i in indices:
        if not -num_layers <= i < num_layers:
            raise ValueError(
                f"layers contains index {i}, out of range for a model with {num_layers} decoder layers"
            )
    normalized = sorted({i % num_layers for i in indices})
    if len(normalized) != len(indices):
        raise ValueError(f"layers contains duplicate indices: {indices}")
    return normalized


def upcycle_to_moe(
    language_model: nn.Module,
    num_experts: int = 4,
    top_k: int = 2,
    layers: str | Sequence[int] = "sparse",
    **moe_kwargs,
) -> list[int]:
    """Replace the FFN of the chosen decoder layers by ``SparseMoeBlock``s of copies of it, in place.

    ``moe_kwargs`` go to :meth:`SparseMoeBlock.from_dense` (capacity factors, noise, ...).
    Returns the converted layer indices.
    """
    if num_experts < 2:
        raise ValueError(f"num_experts must be >= 2, got num_experts={num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got top_k={top_k}")
    decoder_layers = find_decoder_layers(language_model)
    indices = resolve_moe_layers(layers, len(decoder_layers))
    # Validate every layer before changing any, so a failure leaves the model untouched.
    ffn_names = {i: find_ffn_name(decoder_layers[i]) for i in indices}
    for i, name in ffn_names.items():
        if isinstance(getattr(decoder_layers[i], name), SparseMoeBlock):
            raise ValueError(f"layers: decoder layer {i} is already a SparseMoeBlock")
    hidden_size = getattr(_text_config(language_model), "hidden_size", None)
    for i, name in ffn_names.items():
        layer = decoder_layers[i]
        mlp = getattr(layer, name)
        block = SparseMoeBlock.from_dense(
            mlp, num_experts=num_experts, top_k=top_k, hidden_size=hidden_size, **moe_kwargs
        )
        setattr(layer, name, block.train(mlp.training))  # a new module would otherwise be in train mode
    return indices
