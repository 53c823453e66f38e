"""Sparse top-k Mixture-of-Experts FFN, a drop-in replacement for a decoder layer's MLP.

* :mod:`.router`: :class:`TopKRouter`, the routing decision (fp32 softmax, top-k, capacity and
  drop order, renormalisation), the aux and z losses and :class:`RouterStats`;
* :mod:`.experts`: :class:`Experts`, the expert FFNs and the two ways to run them (a loop over
  the modules, grouped GEMMs for recognised layouts);
* :mod:`.block`: :class:`SparseMoeBlock`, which joins them, and the model-level helpers.
"""

from moe_llava._lazy import lazy_exports

_EXPORTS = {
    "EXPERT_PATHS": "moe_llava.model.moe.block",
    "SparseMoeBlock": "moe_llava.model.moe.block",
    "moe_blocks": "moe_llava.model.moe.block",
    "moe_losses": "moe_llava.model.moe.block",
    "router_losses_disabled": "moe_llava.model.moe.block",
    "set_routing_masks": "moe_llava.model.moe.block",
    "GROUPED_LAYOUTS": "moe_llava.model.moe.experts",
    "Experts": "moe_llava.model.moe.experts",
    "grouped_layout": "moe_llava.model.moe.experts",
    "RouterStats": "moe_llava.model.moe.router",
    "Routing": "moe_llava.model.moe.router",
    "TopKRouter": "moe_llava.model.moe.router",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
