"""``SparseMoeBlock``: a top-k MoE FFN, the drop-in replacement for a decoder layer's MLP.

It joins a :class:`~moe_llava.model.moe.router.TopKRouter` (which tokens go to which expert) and
:class:`~moe_llava.model.moe.experts.Experts` (copies of the dense FFN, run on their tokens).
Token-level side information (padding and image/text masks) reaches the block through
:func:`set_routing_masks`, because a decoder layer calls its MLP with hidden states only.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from moe_llava.model.moe.experts import Experts, grouped_layout, grouped_mm_function
from moe_llava.model.moe.router import RouterStats, Routing, TopKRouter

EXPERT_PATHS = ("auto", "loop", "grouped_mm")
# Hopper and newer: where torch's bf16 grouped GEMM kernels beat calling the experts one by one.
_MIN_GROUPED_CAPABILITY = (9, 0)


class SparseMoeBlock(nn.Module):
    """Top-k MoE over copies of a dense FFN.

    Args:
        experts: the expert modules (any FFN mapping (n, d) to (n, d)), at least 2.
        hidden_size: d, the router's input width.
        top_k, capacity_factor, eval_capacity_factor, min_capacity, second_expert_noise,
            renormalize: routing settings, see :class:`TopKRouter` (capacity None = dropless).
        count_padding: route padding like any token (the reference behaviour) instead of leaving
            it out of routing, capacity, statistics and the aux loss.
        expert_path: how the experts run (:mod:`moe_llava.model.moe.experts`). ``"loop"`` calls
            each expert module; ``"grouped_mm"`` runs the experts of a recognised layout as grouped
            GEMMs; ``"auto"`` takes ``grouped_mm`` for bf16 inputs on a CUDA GPU of compute
            capability >= 9.0 when the layout is recognised and its sizes are 16-byte aligned,
            ``loop`` otherwise. Hooks on the expert modules run on the loop path only: pass
            ``"loop"`` when they must see every call.

    Attributes:
        router: the :class:`TopKRouter` (an fp32 ``nn.Linear(hidden_size, num_experts)``).
        experts: :class:`Experts`, modules with the dense FFN's exact class, names and shapes.
        aux_loss, z_loss: losses of the latest forward (0-dim tensors with grad), computed when
            first read, so a forward whose losses nobody uses does not pay for them; None while
            :func:`router_losses_disabled` is on.
        last_stats: :class:`RouterStats` of the latest forward, computed when first read.
        last_expert_path: the path the latest forward took (``"loop"`` or ``"grouped_mm"``).
    """

    def __init__(
        self,
        experts: list[nn.Module],
        hidden_size: int,
        top_k: int = 2,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 0,
        second_expert_noise: bool = False,
        count_padding: bool = False,
        renormalize: bool | None = None,
        expert_path: str = "auto",
    ):
        super().__init__()
        if expert_path not in EXPERT_PATHS:
            raise ValueError(f"expert_path must be one of {EXPERT_PATHS}, got expert_path={expert_path!r}")
        self.experts = Experts(experts)
        self.router = TopKRouter(
            hidden_size,
            len(experts),
            top_k=top_k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            min_capacity=min_capacity,
            second_expert_noise=second_expert_noise,
            renormalize=renormalize,
            device=next(self.experts.parameters()).device,
        )
        if expert_path == "grouped_mm" and (self.experts.layout is None or grouped_mm_function() is None):
            raise ValueError(
                "expert_path='grouped_mm' needs a torch with a grouped GEMM and experts of a recognised FFN "
                "layout (moe_llava.model.moe.experts.GROUPED_LAYOUTS); use expert_path='loop'"
            )
        self.num_experts = len(experts)
        self.top_k = top_k
        self.expert_path = expert_path
        self.count_padding = count_padding
        # Off during generation (see `router_losses_disabled`): the model reads the losses after
        # every forward, and on a decode step their reductions would be a fixed per-token cost.
        self.compute_losses = True
        self.padding_mask: torch.Tensor | None = None
        self.modality_mask: torch.Tensor | None = None
        self._latest = _LatestForward()
        self._auto_grouped = self._grouped_by_auto()

    def _grouped_by_auto(self) -> bool:
        return (
            self.expert_path == "auto"
            and self.experts.layout is not None
            and grouped_mm_function() is not None
            and self.experts.aligned_for_grouped_mm()
        )

    def refresh_expert_layout(self) -> None:
        """Re-detect the experts' layout after their children were replaced (LoRA-wrapped linears
        have none: the loop path runs them; merged back, the grouped path can again)."""
        self.experts.layout = grouped_layout(list(self.experts))
        self._auto_grouped = self._grouped_by_auto()

    @classmethod
    def from_dense(
        cls, mlp: nn.Module, num_experts: int = 4, top_k: int = 2, hidden_size: int | None = None, **kwargs
    ) -> SparseMoeBlock:
        """Upcycle ``mlp``: ``num_experts`` exact copies of it behind a fresh router."""
        if num_experts < 2:
            raise ValueError(f"num_experts must be >= 2, got num_experts={num_experts}")
        if hidden_size is None:
            first_linear = next((m for m in mlp.modules() if isinstance(m, nn.Linear)), None)
            if first_linear is None:
                raise ValueError(
                    f"cannot infer hidden_size of {type(mlp).__name__}: it has no nn.Linear; pass hidden_size="
                )
            hidden_size = first_linear.in_features
        experts = [copy.deepcopy(mlp) for _ in range(num_experts)]
        return cls(experts, hidden_size, top_k=top_k, **kwargs)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, expert_path={self.expert_path!r}"

    def capacity(self, num_tokens: int) -> int | None:
        """Slots per expert for ``num_tokens`` routed tokens in the current mode, or None when dropless."""
        return self.router.capacity(num_tokens)

    def resolve_expert_path(self, x: torch.Tensor) -> str:
        """The path (``"loop"`` or ``"grouped_mm"``) a forward on input ``x`` takes; see ``expert_path``."""
        if self.expert_path != "auto":
            return self.expert_path
        if (
            self._auto_grouped
            and x.is_cuda
            and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= _MIN_GROUPED_CAPABILITY
        ):
            return "grouped_mm"
        return "loop"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        # The masks of this forward's tokens (set by set_routing_masks), flattened like x.
        valid, is_image = self._token_masks(hidden_states.shape[:-1])
        # Route in fp32: each token's top-k experts and gate weights, capacity applied.
        routing = self.router.route(x, valid)
        # Run every expert on its tokens and add the gated outputs back at their tokens.
        path = self.resolve_expert_path(x)
        out = self.experts(x, routing, path)
        # Keep the routing; losses and statistics are computed only if someone reads them.
        self._latest.record(routing, is_image, path, self.compute_losses)
        return out.view(hidden_states.shape)

    def _token_masks(self, token_shape: torch.Size) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Flattened (valid, is_image) masks when they match this forward's tokens, else None."""

        def flat(mask):
            if mask is None or tuple(mask.shape) != tuple(token_shape):
                return None
            return mask.reshape(-1).bool()

        valid = None if self.count_padding else flat(self.padding_mask)
        return valid, flat(self.modality_mask)

    @property
    def aux_loss(self) -> torch.Tensor | None:
        losses = self._latest.read_losses(self.router)
        return None if losses is None else losses[0]

    @property
    def z_loss(self) -> torch.Tensor | None:
        losses = self._latest.read_losses(self.router)
        return None if losses is None else losses[1]

    @property
    def last_stats(self) -> RouterStats | None:
        return self._latest.read_stats(self.router)

    @property
    def last_expert_path(self) -> str | None:
        return self._latest.expert_path


class _LatestForward:
    """What the block's latest forward left for its losses and statistics.

    A plain object rather than module attributes, because ``nn.Module.__setattr__`` has a
    per-attribute cost on every forward. Copies and pickles start empty: the routing tensors
    belong to the original's autograd graph (``copy.deepcopy`` of a model right after a training
    forward would otherwise fail on them), and a copy has not run a forward yet.
    """

    __slots__ = ("expert_path", "is_image", "losses", "losses_pending", "routing", "stats")

    def __init__(self):
        self.routing: Routing | None = None
        self.is_image: torch.Tensor | None = None
        self.expert_path: str | None = None
        self.losses: tuple[torch.Tensor, torch.Tensor] | None = None
        self.losses_pending = False
        self.stats: RouterStats | None = None

    def __reduce__(self):
        return (_LatestForward, ())

    def record(self, routing: Routing, is_image: torch.Tensor | None, path: str, losses: bool) -> None:
        self.routing, self.is_image, self.expert_path = routing, is_image, path
        self.losses, self.losses_pending, self.stats = None, losses, None

    def read_losses(self, router: TopKRouter) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.losses_pending:
            self.losses, self.losses_pending = router.losses(self.routing), False
        return self.losses

    def read_stats(self, router: TopKRouter) -> RouterStats | None:
        if self.stats is None and self.routing is not None:
            self.stats = router.stats(self.routing, self.is_image)
        return self.stats


def moe_blocks(model: nn.Module) -> list[tuple[str, SparseMoeBlock]]:
    """(qualified name, block) of every SparseMoeBlock in ``model``, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, SparseMoeBlock)]


def set_routing_masks(
    model: nn.Module, padding_mask: torch.Tensor | None = None, modality_mask: torch.Tensor | None = None
) -> None:
    """Tell every MoE block of ``model`` which tokens of the next forward are real and which are image tokens.

    Both masks are (batch, seq) and describe the tokens fed to the decoder (True/1 = real token,
    True = image token). A block ignores masks whose shape does not match its input (e.g. the
    one-token decode steps of generation). The masks stay set so that activation-checkpoint
    recomputation during backward routes exactly as the forward did.
    """
    for _, block in moe_blocks(model):
        block.padding_mask = padding_mask
        block.modality_mask = modality_mask


@contextlib.contextmanager
def router_losses_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block, MoE blocks of ``model`` skip their aux/z losses (statistics are still kept)."""
    blocks = [block for _, block in moe_blocks(model)]
    previous = [block.compute_losses for block in blocks]
    for block in blocks:
        block.compute_losses = False
    try:
        yield
    finally:
        for block, value in zip(blocks, previous):
            block.compute_losses = value


def moe_losses(model: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Sum over MoE blocks of the latest forward's (aux_loss, z_loss); (None, None) without MoE blocks."""
    blocks = [block for _, block in moe_blocks(model) if block.aux_loss is not None]
    if not blocks:
        return None, None
    return torch.stack([b.aux_loss for b in blocks]).sum(), torch.stack([b.z_loss for b in blocks]).sum()
