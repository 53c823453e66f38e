"""Sparse top-k Mixture-of-Experts FFN, a drop-in replacement for a decoder layer's MLP.

* :mod:`.router`: :class:`TopKRouter`, the routing decision (fp32 softmax, top-k, capacity and
  drop order, renormalisation), the aux and z losses and :class:`RouterStats`;
* :mod:`.experts`: :class:`Experts`, the expert FFNs and the two ways to run them (a loop over
  the modules, grouped GEMMs for recognised layouts);
* :mod:`.block`: :class:`SparseMoeBlock`, which joins them, and the model-level helpers.
"""

from moe_llava.model.moe.block import (
    EXPERT_PATHS,
    SparseMoeBlock,
    moe_blocks,
    moe_losses,
    router_losses_disabled,
    set_routing_masks,
)
from moe_llava.model.moe.experts import GROUPED_LAYOUTS, Experts, grouped_layout
from moe_llava.model.moe.router import RouterStats, Routing, TopKRouter

__all__ = [
    "EXPERT_PATHS",
    "GROUPED_LAYOUTS",
    "Experts",
    "RouterStats",
    "Routing",
    "SparseMoeBlock",
    "TopKRouter",
    "grouped_layout",
    "moe_blocks",
    "moe_losses",
    "router_losses_disabled",
    "set_routing_masks",
]
