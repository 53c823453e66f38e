"""The MoE router: which experts each token goes to, with what weight, and which assignments are dropped.

Routing follows the MoE-LLaVA reference (DeepSpeed's ``top2gating``): an fp32 linear router,
softmax over all experts, top-1 = argmax, top-2 = best remaining expert, capacity
``C = max(min_capacity, ceil(S / E * capacity_factor * k))`` filled in token order with every
top-1 assignment before any top-2 one, kept gate weights renormalised to sum to 1. Differences:
assignments are sorted by expert (cost linear in tokens) instead of the reference's one-hot
(tokens x experts x capacity) tensors; capacity ``None`` means dropless; the second-expert
Gumbel noise is optional and training-only; padding tokens can be left out of routing.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterStats:
    """Routing statistics of one MoE layer's latest forward (detached tensors, on the layer's device).

    Counts cover non-padding tokens only (unless the block counts padding). ``*_top1`` counts a
    token once, for its top-1 expert; ``assigned`` counts all k assignments before capacity;
    ``kept`` after capacity. The image/text split is present when a modality mask was given.
    """

    num_tokens: torch.Tensor  # scalar
    top1: torch.Tensor  # (E,)
    assigned: torch.Tensor  # (E,)
    kept: torch.Tensor  # (E,)
    entropy: torch.Tensor  # scalar, mean routing entropy (nats) per token
    image_top1: torch.Tensor | None = None  # (E,)
    text_top1: torch.Tensor | None = None  # (E,)
    image_assigned: torch.Tensor | None = None  # (E,)
    text_assigned: torch.Tensor | None = None  # (E,)

    @property
    def drop_fraction(self) -> float:
        assigned = float(self.assigned.sum())
        return 0.0 if assigned == 0 else 1.0 - float(self.kept.sum()) / assigned


@dataclass
class Routing:
    """One forward's routing of S token slots (batch x sequence, flattened) to E experts, top-k each.

    An *assignment* is one (token, rank) pair, numbered rank-major: ``rank * S + token``.
    """

    logits: torch.Tensor  # (S, E) fp32
    probs: torch.Tensor  # (S, E) softmax of the logits
    topk_idx: torch.Tensor  # (S, k) chosen experts, top-1 first
    order: torch.Tensor  # (N,) ids of the kept assignments, grouped by expert, priority order inside
    gate: torch.Tensor  # (N,) fp32 gate weight of each kept assignment (after renormalisation)
    assigned: torch.Tensor  # (E,) assignments per expert before capacity
    kept: torch.Tensor  # (E,) assignments per expert after capacity
    valid: torch.Tensor | None  # (S,) real (non-padding) tokens; None = all
    num_tokens: int  # real tokens

    @property
    def token_idx(self) -> torch.Tensor:
        """(N,) the token of each kept assignment, in ``order``."""
        return self.order % self.probs.shape[0]


class TopKRouter(nn.Linear):
    """``nn.Linear(hidden_size, num_experts, bias=False)`` in fp32 that also makes the routing decision.

    Calling it gives the logits, like the linear it is (so checkpoints keep the ``router.weight``
    key); :meth:`route` gives the whole :class:`Routing`.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 0,
        second_expert_noise: bool = False,
        renormalize: bool | None = None,
        device: torch.device | None = None,
    ):
        if num_experts < 2:
            raise ValueError(f"num_experts must be >= 2, got num_experts={num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got top_k={top_k}")
        for name, value in (
            ("capacity_factor", capacity_factor),
            ("eval_capacity_factor", eval_capacity_factor),
        ):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or None (dropless), got {name}={value}")
        if min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got min_capacity={min_capacity}")
        super().__init__(hidden_size, num_experts, bias=False, device=device, dtype=torch.float32)
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.second_expert_noise = second_expert_noise
        # The reference renormalises top-2 weights but feeds top-1 its raw probability (so the
        # router still gets an LM gradient); `None` reproduces both.
        self.renormalize = top_k > 1 if renormalize is None else renormalize

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
            f"eval_capacity_factor={self.eval_capacity_factor}, min_capacity={self.min_capacity}"
        )

    def capacity(self, num_tokens: int) -> int | None:
        """Slots per expert for ``num_tokens`` routed tokens, or None when dropless."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return None
        return max(self.min_capacity, math.ceil(num_tokens / self.num_experts * factor * self.top_k))

    def route(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> Routing:
        """Route the rows of ``x`` (S, d); rows where ``valid`` is False (padding) get no expert."""
        num_slots, k, num_experts = x.shape[0], self.top_k, self.num_experts
        logits = _fp32_linear(x, self.weight)
        probs = logits.softmax(dim=-1)
        topk_prob, topk_idx = self._select(logits, probs)

        # Assignments in priority order: all top-1 choices in token order, then all top-2, ...
        flat_expert = topk_idx.t().reshape(-1)
        if valid is not None:  # padding goes to a sentinel expert E that is never computed
            flat_expert = torch.where(valid.repeat(k), flat_expert, num_experts)
        order = torch.argsort(flat_expert, stable=True)  # grouped by expert, priority order inside
        assigned = torch.bincount(flat_expert, minlength=num_experts + 1)
        num_tokens = num_slots if valid is None else int(valid.sum())

        capacity = self.capacity(num_tokens)
        if capacity is not None and capacity >= num_tokens:
            # A token's k experts are distinct, so no expert gets more than num_tokens assignments:
            # such a capacity drops nothing (e.g. evaluation at factor 2.0, top-2 of 4).
            capacity = None
        if capacity is None and valid is None:
            # Dropless without padding (inference, the default): every assignment is kept, so the
            # bookkeeping below would be the identity; skipping it saves a dozen small ops.
            weights, kept_order, kept = topk_prob, order, assigned
        else:
            # Position of each assignment in its expert's queue; keep the first `capacity`.
            sorted_expert = flat_expert[order]
            keep_sorted = sorted_expert < num_experts
            if capacity is not None:
                group_start = assigned.cumsum(0) - assigned
                position = torch.arange(order.numel(), device=x.device) - group_start[sorted_expert]
                keep_sorted &= position < capacity
            keep = torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted).view(k, num_slots).t()
            weights = topk_prob * keep
            kept_order = order[keep_sorted]
            kept = torch.bincount(sorted_expert[keep_sorted], minlength=num_experts + 1)
        if self.renormalize:
            # The reference's clamp (DeepSpeed top2gating: eps, not tiny): a token whose top-1 was
            # dropped keeps a near-zero top-2 gate near zero instead of scaling it up to 1.
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).eps)

        return Routing(
            logits=logits,
            probs=probs,
            topk_idx=topk_idx,
            order=kept_order,
            gate=weights.t().reshape(-1)[kept_order],
            assigned=assigned[:num_experts],
            kept=kept[:num_experts],
            valid=valid,
            num_tokens=num_tokens,
        )

    def _select(self, logits: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, k) probabilities and indices of the chosen experts: argmax first, then the best of
        the rest (Gumbel-noised in training when ``second_expert_noise``, as in the reference)."""
        if not (self.second_expert_noise and self.training and self.top_k > 1):
            return probs.topk(self.top_k, dim=-1)
        first = probs.argmax(dim=-1, keepdim=True)
        uniform = torch.rand_like(logits).clamp_(1e-9, 1 - 1e-9)
        noisy = (logits - torch.log(-torch.log(uniform))).scatter(1, first, float("-inf"))
        indices = torch.cat([first, noisy.topk(self.top_k - 1, dim=-1).indices], dim=-1)
        return probs.gather(1, indices), indices

    def losses(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """(aux_loss, z_loss): the Switch/GShard balance loss on top-1 counts before dropping
        (minimum 1.0 when balanced) and the ST-MoE router z-loss, over real tokens."""
        probs, logits, topk_idx = routing.probs, routing.logits, routing.topk_idx
        if routing.valid is not None:
            probs, logits, topk_idx = probs[routing.valid], logits[routing.valid], topk_idx[routing.valid]
        denom = max(routing.num_tokens, 1)
        top1_counts = torch.bincount(topk_idx[:, 0], minlength=self.num_experts)
        mean_prob = probs.sum(dim=0) / denom
        aux_loss = self.num_experts * (mean_prob * top1_counts.to(mean_prob.dtype) / denom).sum()
        z_loss = torch.logsumexp(logits, dim=-1).square().sum() / denom
        return aux_loss, z_loss

    @torch.no_grad()
    def stats(self, routing: Routing, is_image: torch.Tensor | None = None) -> RouterStats:
        """Expert counts and routing entropy of ``routing`` over real tokens (image/text split by ``is_image``)."""
        probs, topk_idx = routing.probs.detach(), routing.topk_idx
        if routing.valid is not None:
            probs, topk_idx = probs[routing.valid], topk_idx[routing.valid]
            is_image = is_image[routing.valid] if is_image is not None else None
        num_experts = self.num_experts
        top1 = topk_idx[:, 0]
        stats = RouterStats(
            num_tokens=torch.tensor(routing.num_tokens),
            top1=torch.bincount(top1, minlength=num_experts),
            assigned=routing.assigned,
            kept=routing.kept,
            entropy=-(probs * probs.clamp_min(1e-12).log()).sum(-1).sum() / max(routing.num_tokens, 1),
        )
        if is_image is not None:
            stats.image_top1 = torch.bincount(top1[is_image], minlength=num_experts)
            stats.text_top1 = torch.bincount(top1[~is_image], minlength=num_experts)
            stats.image_assigned = torch.bincount(topk_idx[is_image].reshape(-1), minlength=num_experts)
            stats.text_assigned = torch.bincount(topk_idx[~is_image].reshape(-1), minlength=num_experts)
        return stats


def _fp32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` in fp32, also under bf16 autocast (which is switched off only when on,
    because entering the context has a cost of its own)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        context = torch.autocast(device_type=device_type, enabled=False)
    else:
        context = contextlib.nullcontext()
    with context:
        return F.linear(x.float(), weight.float())
