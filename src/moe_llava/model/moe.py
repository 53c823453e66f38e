"""Sparse top-k Mixture-of-Experts FFN, a drop-in replacement for a decoder layer's MLP.

Routing follows the MoE-LLaVA reference (DeepSpeed's `top2gating`): an fp32 linear router,
softmax over all experts, top-1 = argmax, top-2 = best remaining expert, capacity
``C = max(min_capacity, ceil(S / E * capacity_factor * k))`` filled in token order with every
top-1 assignment before any top-2 one, kept gate weights renormalised to sum to 1. What it
does differently from the reference:

* dispatch sorts token copies by expert and gathers them (cost linear in tokens), instead of the
  one-hot ``einsum`` over a (tokens x experts x capacity) tensor (quadratic in tokens);
* with autograd on, every expert runs every step, on a possibly empty slice, so all parameters
  take part in the graph and plain DDP needs no ``find_unused_parameters`` (inference skips
  experts that got no token);
* capacity ``None`` means dropless; second-expert Gumbel noise is optional and training-only;
* the experts run one of two ways, chosen per forward (:meth:`SparseMoeBlock._expert_path`):
  ``loop`` calls each expert module on its slice (any FFN; the fastest way on CPU, where a
  grouped GEMM is itself a loop), ``grouped_mm`` runs all experts of a recognised FFN layout
  (Llama-style gate/up/down, Phi-style fc1/fc2) as grouped GEMMs over their stacked weights,
  picked automatically for bf16 on CUDA GPUs of compute capability 9.0 (Hopper) and newer;
* padding tokens are excluded from routing, capacity, statistics and the aux loss.

Token-level side information (padding and image/text masks) reaches the block through
:func:`set_routing_masks`, because a decoder layer calls its MLP with hidden states only.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
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


# Expert layouts the grouped-GEMM path understands: attribute names of (input linears, output
# linear, activation). "gated" computes out(act(in_0(x)) * in_1(x)), "plain" out(act(in_0(x))).
_GROUPED_LAYOUTS = {
    "gated": (("gate_proj", "up_proj"), "down_proj", "act_fn"),
    "plain": (("fc1",), "fc2", "activation_fn"),
}
_MIN_GROUPED_CAPABILITY = (9, 0)  # Hopper: where torch's bf16 grouped GEMM kernels are the fast path


def _grouped_mm():
    """``F.grouped_mm`` (torch >= 2.10) or ``torch._grouped_mm``; None when this torch has neither."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _global_hooks() -> bool:
    return any(
        getattr(nn.modules.module, name, None)
        for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")
    )


def _own_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or getattr(module, "_backward_pre_hooks", None)
    )


def _has_hooks(module: nn.Module) -> bool:
    return _global_hooks() or any(_own_hooks(m) for m in module.modules())


def _shared_layout(experts: nn.ModuleList) -> str | None:
    """The layout whose children all ``experts`` have (plain ``nn.Linear`` of equal shapes and
    biases, one activation type), else None. Hooks are not looked at."""
    for layout, (inputs, output, act) in _GROUPED_LAYOUTS.items():
        names = (*inputs, output)
        if all(
            all(type(getattr(e, n, None)) is nn.Linear for n in names) and callable(getattr(e, act, None))
            for e in experts
        ):
            first = experts[0]
            shapes = [tuple(getattr(first, n).weight.shape) for n in names]
            biases = [getattr(first, n).bias is not None for n in names]
            acts = {type(getattr(e, act)) for e in experts}
            if len(acts) == 1 and all(
                [tuple(getattr(e, n).weight.shape) for n in names] == shapes
                and [getattr(e, n).bias is not None for n in names] == biases
                for e in experts
            ):
                return layout
    return None


def _grouped_layout(experts: nn.ModuleList) -> str | None:
    """The layout name shared by all ``experts`` (plain ``nn.Linear`` children, no hooks), else None."""
    if any(_has_hooks(e) for e in experts):
        return None
    return _shared_layout(experts)


class SparseMoeBlock(nn.Module):
    """Top-k MoE over copies of a dense FFN.

    Attributes:
        router: ``nn.Linear(hidden_size, num_experts, bias=False)``, evaluated in fp32.
        experts: ``nn.ModuleList`` of modules with the dense FFN's exact class, names and shapes.
        aux_loss, z_loss: losses of the latest forward (0-dim tensors with grad), computed when
            first read: like ``transformers``' MoE blocks, a forward whose losses nobody uses
            (evaluation, benchmarks) does not pay for them.
        last_stats: :class:`RouterStats` of the latest forward, computed when first read (a decode
            step that nobody inspects pays only for keeping a few detached tensors).
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
    ):
        super().__init__()
        num_experts = len(experts)
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
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.second_expert_noise = second_expert_noise
        self.count_padding = count_padding
        # The reference renormalises top-2 weights but feeds top-1 its raw probability (so the router
        # still gets an LM gradient); `None` reproduces both.
        self.renormalize = top_k > 1 if renormalize is None else renormalize
        self.experts = nn.ModuleList(experts)
        weight = next(experts[0].parameters())
        self.router = nn.Linear(
            hidden_size, num_experts, bias=False, device=weight.device, dtype=torch.float32
        )

        self.padding_mask: torch.Tensor | None = None
        self.modality_mask: torch.Tensor | None = None
        self._latest = _LatestForward()
        # Off during generation (see `router_losses_disabled`): the model reads the losses after
        # every forward, and on a decode step their reductions would be a fixed per-token cost.
        self.compute_losses = True
        # Expert execution: None = automatic (see `_expert_path`); "loop" or "grouped_mm" forces one
        # (tests, benchmarks). Grouped-path self-checks are cached per device/dtype/expert set.
        self._expert_path_override: str | None = None
        self._grouped_checked: dict[tuple, bool] = {}
        self._layout_cache: tuple[tuple, str | None] | None = None

    @classmethod
    def from_dense(
        cls,
        mlp: nn.Module,
        num_experts: int = 4,
        top_k: int = 2,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 0,
        hidden_size: int | None = None,
        **kwargs,
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
        return cls(
            experts,
            hidden_size,
            top_k=top_k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            min_capacity=min_capacity,
            **kwargs,
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
            f"eval_capacity_factor={self.eval_capacity_factor}, min_capacity={self.min_capacity}"
        )

    # ------------------------------------------------------------------ routing
    def _token_masks(self, token_shape: torch.Size) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Flattened (valid, is_image) masks when they match this forward's tokens, else None."""

        def flat(mask):
            if mask is None or tuple(mask.shape) != tuple(token_shape):
                return None
            return mask.reshape(-1).bool()

        valid = None if self.count_padding else flat(self.padding_mask)
        return valid, flat(self.modality_mask)

    def _select_experts(self, logits: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, k) probabilities and indices of the chosen experts: argmax first, then the best of
        the rest (optionally Gumbel-noised)."""
        if not (self.second_expert_noise and self.training and self.top_k > 1):
            return probs.topk(self.top_k, dim=-1)
        first = probs.argmax(dim=-1, keepdim=True)
        uniform = torch.rand_like(logits).clamp_(1e-9, 1 - 1e-9)
        noisy = logits - torch.log(-torch.log(uniform))
        noisy = noisy.scatter(1, first, float("-inf"))
        rest = noisy.topk(self.top_k - 1, dim=-1).indices
        indices = torch.cat([first, rest], dim=-1)
        return probs.gather(1, indices), indices

    def capacity(self, num_tokens: int) -> int | None:
        """Slots per expert for ``num_tokens`` routed tokens, or None when dropless."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return None
        return max(self.min_capacity, math.ceil(num_tokens / self.num_experts * factor * self.top_k))

    # ------------------------------------------------------------------ expert execution
    def _expert_path(self, x: torch.Tensor) -> str:
        """How this forward runs the experts on input ``x``: ``"loop"`` or ``"grouped_mm"``.

        Automatic choice: ``grouped_mm`` for bf16 on a CUDA GPU of compute capability >= 9.0 when
        this torch has a grouped GEMM, the experts share a recognised layout (no hooks, plain
        ``nn.Linear`` children, feature sizes that keep rows 16-byte aligned) and a one-time
        self-check shows the grouped computation equals calling the experts; ``loop`` otherwise.
        """
        if self._expert_path_override is not None:
            return self._expert_path_override
        if not (x.is_cuda and x.dtype == torch.bfloat16 and _grouped_mm() is not None):
            return "loop"
        if torch.cuda.get_device_capability(x.device) < _MIN_GROUPED_CAPABILITY:
            return "loop"
        layout = self._experts_layout()
        if layout is None:
            return "loop"
        inputs, output, _ = _GROUPED_LAYOUTS[layout]
        first = self.experts[0]
        if any(size % 8 for n in (*inputs, output) for size in getattr(first, n).weight.shape):
            return "loop"  # grouped GEMM kernels need 16-byte aligned bf16 rows
        key = (x.device, x.dtype, layout, self._layout_cache[0])
        if key not in self._grouped_checked:
            self._grouped_checked[key] = self._grouped_self_check(x, layout)
        return "grouped_mm" if self._grouped_checked[key] else "loop"

    def _experts_layout(self) -> str | None:
        """``_grouped_layout(self.experts)`` at a fraction of its cost (~80 us of Python, twice per
        forward on the grouped path): the structural part is cached while the experts and their
        children stay the same objects; hooks are looked at every time."""
        modules = [m for e in self.experts for m in (e, *e._modules.values())]
        key = tuple(map(id, modules))
        if self._layout_cache is None or self._layout_cache[0] != key:
            self._layout_cache = (key, _shared_layout(self.experts))
        if self._layout_cache[1] is None or _global_hooks() or any(map(_own_hooks, modules)):
            return None
        return self._layout_cache[1]

    def _grouped_self_check(self, x: torch.Tensor, layout: str, rows_per_expert: int = 16) -> bool:
        """Whether the grouped computation reproduces the expert modules on a random probe."""
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(rows_per_expert * self.num_experts, x.shape[-1], generator=generator)
        probe = probe.to(device=x.device, dtype=x.dtype)
        counts = torch.full((self.num_experts,), rows_per_expert, device=x.device)
        with torch.no_grad():
            expected = torch.cat(
                [expert(chunk) for expert, chunk in zip(self.experts, probe.split(rows_per_expert))]
            )
            got = self._grouped_expert_outputs(probe, counts, layout)
        tol = 1e-5 if x.dtype == torch.float32 else 3e-2
        scale = expected.float().abs().max().clamp_min(1e-6)
        return bool(((got.float() - expected.float()).abs().max() / scale) <= tol)

    def _grouped_expert_outputs(self, xs: torch.Tensor, counts: torch.Tensor, layout: str) -> torch.Tensor:
        """Every expert applied to its rows of ``xs`` (grouped by expert, ``counts`` rows each) with
        grouped GEMMs over the experts' stacked weights (autograd reaches each expert's parameters)."""
        grouped_mm = _grouped_mm()
        inputs, output, act = _GROUPED_LAYOUTS[layout]
        experts = self.experts
        offsets = counts.cumsum(0).to(torch.int32)
        needs_bias = any(getattr(experts[0], n).bias is not None for n in (*inputs, output))
        row_expert = (
            torch.repeat_interleave(
                torch.arange(self.num_experts, device=xs.device), counts, output_size=xs.shape[0]
            )
            if needs_bias
            else None
        )

        def linear(h: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
            # one grouped GEMM for the linears in `names` (gate and up are fused into one)
            weight = torch.stack([torch.cat([getattr(e, n).weight for n in names]) for e in experts])
            out = grouped_mm(h, weight.transpose(-2, -1), offs=offsets)
            if row_expert is not None:
                bias = torch.stack([torch.cat([getattr(e, n).bias for n in names]) for e in experts])
                out = out + bias.index_select(0, row_expert)
            return out

        h = linear(xs, inputs)
        act_fn = getattr(experts[0], act)
        if layout == "gated":
            gate, up = h.chunk(2, dim=-1)
            h = act_fn(gate) * up
        else:
            h = act_fn(h)
        return linear(h.contiguous(), (output,))

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        token_shape = hidden_states.shape[:-1]
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        num_slots, k, num_experts = x.shape[0], self.top_k, self.num_experts
        valid, is_image = self._token_masks(token_shape)

        logits = _router_logits(x, self.router.weight)  # (S, E), fp32
        probs = logits.softmax(dim=-1)
        topk_prob, topk_idx = self._select_experts(logits, probs)  # (S, k) each

        # Assignments in priority order: all rank-0 (top-1) choices in token order, then rank-1, ...
        flat_expert = topk_idx.t().reshape(-1)  # (k*S,)
        if valid is not None:  # padding goes to a sentinel bin E that is never computed
            flat_expert = torch.where(valid.repeat(k), flat_expert, num_experts)
        order = torch.argsort(flat_expert, stable=True)  # grouped by expert, priority order inside
        assigned = torch.bincount(flat_expert, minlength=num_experts + 1)
        num_tokens = num_slots if valid is None else int(valid.sum())

        capacity = self.capacity(num_tokens)
        if capacity is not None and capacity >= num_tokens:
            # A token's k experts are distinct, so no expert can get more than num_tokens
            # assignments: this capacity drops nothing (e.g. evaluation at factor 2.0, top-2 of 4).
            capacity = None
        if capacity is None and valid is None:
            # Dropless without padding (inference, the default): every assignment is kept, so the
            # capacity bookkeeping below is the identity; skip its dozen small ops and host syncs.
            weights, kept_order, kept = topk_prob, order, assigned[:num_experts]
        else:
            sorted_expert = flat_expert[order]
            keep_sorted = sorted_expert < num_experts
            if capacity is not None:
                group_start = assigned.cumsum(0) - assigned
                position = torch.arange(order.numel(), device=x.device) - group_start[sorted_expert]
                keep_sorted &= position < capacity
            keep = (
                torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted).view(k, num_slots).t()
            )  # (S, k)
            weights = topk_prob * keep
            kept_order = order[keep_sorted]  # flat (rank-major) assignment ids, grouped by expert
            kept = torch.bincount(sorted_expert[keep_sorted], minlength=num_experts + 1)[:num_experts]
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)

        token_idx = kept_order % num_slots
        gate = weights.t().reshape(-1)[kept_order]  # (N,) fp32, grouped by expert like token_idx
        path = self._expert_path(x)
        if path == "grouped_mm":
            layout = self._experts_layout()
            if layout is None:
                raise ValueError("expert path 'grouped_mm' needs experts with a recognised FFN layout")
            # No host sync: offsets stay on the device. Empty experts are empty groups, still in the graph.
            expert_out = self._grouped_expert_outputs(x.index_select(0, token_idx), kept, layout)
            out = x.new_zeros(x.shape, dtype=expert_out.dtype).index_add_(
                0, token_idx, expert_out * gate.unsqueeze(-1).to(expert_out.dtype)
            )
        else:
            counts = kept.tolist()
            expert_inputs = x.index_select(0, token_idx).split(counts)
            # With autograd every expert runs, even on zero tokens, so all of them are in the graph
            # (plain DDP needs no find_unused_parameters). Without it (inference) empty experts are
            # skipped, which is most of them when decoding one token, and the gate scales each
            # expert's fresh output in place. Each expert's output is added into `out` on its own:
            # no concatenated (k*S, d) copy and no full-size product, which at large S are fresh
            # page-faulting allocations.
            inference = not torch.is_grad_enabled()
            out = x.new_zeros(x.shape, dtype=_output_dtype(x))
            gate = gate.to(out.dtype).unsqueeze(-1)
            chunks = zip(self.experts, expert_inputs, token_idx.split(counts), gate.split(counts), counts)
            for expert, chunk, idx, g, count in chunks:
                if inference and count == 0:
                    continue
                expert_out = expert(chunk).to(out.dtype)
                out.index_add_(0, idx, expert_out.mul_(g) if inference else expert_out * g)

        self._record_losses_and_stats(logits, probs, topk_idx, valid, is_image, num_tokens, assigned, kept)
        return out.view(hidden_states.shape)

    def _record_losses_and_stats(self, logits, probs, topk_idx, valid, is_image, num_tokens, assigned, kept):
        # Losses and statistics are a dozen small reductions: deferred to their first read.
        latest = self._latest
        latest.stats = None
        latest.pending_stats = (probs.detach(), topk_idx, valid, is_image, num_tokens, assigned, kept)
        latest.losses = None
        latest.pending_losses = (logits, probs, topk_idx, valid, num_tokens) if self.compute_losses else None

    def _compute_losses(self, logits, probs, topk_idx, valid, num_tokens):
        """(aux_loss, z_loss): the Switch/GShard balance loss on top-1 counts before dropping
        (minimum 1.0 when balanced) and the ST-MoE router z-loss."""
        if valid is not None:
            probs, logits, topk_idx = probs[valid], logits[valid], topk_idx[valid]
        denom = max(num_tokens, 1)
        top1_counts = torch.bincount(topk_idx[:, 0], minlength=self.num_experts)
        mean_prob = probs.sum(dim=0) / denom
        aux_loss = self.num_experts * (mean_prob * top1_counts.to(mean_prob.dtype) / denom).sum()
        z_loss = torch.logsumexp(logits, dim=-1).square().sum() / denom
        return aux_loss, z_loss

    def _losses_of_latest_forward(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        latest = self._latest
        if latest.losses is None and latest.pending_losses is not None:
            latest.losses = self._compute_losses(*latest.pending_losses)
            latest.pending_losses = None
        return latest.losses

    @property
    def aux_loss(self) -> torch.Tensor | None:
        losses = self._losses_of_latest_forward()
        return None if losses is None else losses[0]

    @property
    def z_loss(self) -> torch.Tensor | None:
        losses = self._losses_of_latest_forward()
        return None if losses is None else losses[1]

    @property
    def last_stats(self) -> RouterStats | None:
        latest = self._latest
        if latest.stats is None and latest.pending_stats is not None:
            latest.stats = self._compute_stats(*latest.pending_stats)
            latest.pending_stats = None
        return latest.stats

    @torch.no_grad()
    def _compute_stats(self, probs, topk_idx, valid, is_image, num_tokens, assigned, kept) -> RouterStats:
        if valid is not None:
            probs, topk_idx = probs[valid], topk_idx[valid]
            is_image = is_image[valid] if is_image is not None else None
        num_experts = self.num_experts
        top1 = topk_idx[:, 0]
        denom = max(num_tokens, 1)
        stats = RouterStats(
            num_tokens=torch.tensor(num_tokens),
            top1=torch.bincount(top1, minlength=num_experts),
            assigned=assigned[:num_experts],
            kept=kept,
            entropy=-(probs * probs.clamp_min(1e-12).log()).sum(-1).sum() / denom,
        )
        if is_image is not None:
            stats.image_top1 = torch.bincount(top1[is_image], minlength=num_experts)
            stats.text_top1 = torch.bincount(top1[~is_image], minlength=num_experts)
            stats.image_assigned = torch.bincount(topk_idx[is_image].reshape(-1), minlength=num_experts)
            stats.text_assigned = torch.bincount(topk_idx[~is_image].reshape(-1), minlength=num_experts)
        return stats


class _LatestForward:
    """What the block's latest forward left for its losses and statistics (see ``_record_losses_and_stats``).

    A plain object rather than module attributes: ``nn.Module.__setattr__`` costs a few
    microseconds per attribute on every forward (with ``_router_logits``' autocast check, 5-10% of
    a small block's decode step in a same-process A/B).
    Copies and pickles of a block start empty: the pending tensors belong to the original's
    autograd graph (``copy.deepcopy`` of a model right after a training forward would otherwise
    fail on them), and a copy has not run a forward yet.
    """

    __slots__ = ("losses", "pending_losses", "pending_stats", "stats")

    def __init__(self):
        self.losses: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pending_losses: tuple | None = None
        self.stats: RouterStats | None = None
        self.pending_stats: tuple | None = None

    def __reduce__(self):
        return (_LatestForward, ())


def _router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 router logits of ``x`` (S, d), also under bf16 autocast (whose switching-off context
    costs ~10 us, so it is entered only when autocast is on)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        context = torch.autocast(device_type=device_type, enabled=False)
    else:
        context = contextlib.nullcontext()
    with context:
        return F.linear(x.float(), weight.float())


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """What the experts' Linear layers return for ``x``: the autocast dtype when autocast is on."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


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
