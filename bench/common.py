"""Pieces shared by the model-level suites (training, generation, data, e2e): config overrides,
interleaved timing with contention control, correctness checks, target verdicts and table text.

The layer suite (:mod:`bench.moe_layer`) predates this module and keeps its own copies.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from bench import device as device_lib
from bench.timing import LoadMonitor, TimingResult, time_interleaved


# ---------------------------------------------------------------------------- configs
def replace_config(base, suite: str, overrides: dict):
    """``base`` (a dataclass) with ``overrides`` applied; lists become tuples; unknown names fail clearly."""
    names = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"suite {suite!r} has no option(s) {unknown}; its options: {sorted(names)}")
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items()}
    return dataclasses.replace(base, **values)


def config_fields(config) -> set[str]:
    return {f.name for f in dataclasses.fields(config)}


# ---------------------------------------------------------------------------- timing
def timed_case(
    variants: dict[str, Callable[[], object]],
    cfg,
    device: torch.device | None = None,
    before_each: Callable[[str], None] | None = None,
) -> tuple[TimingResult, dict]:
    """:func:`bench.timing.time_interleaved` with the suite config's rounds and contention settings.

    ``cfg`` needs ``repeats``, ``warmup``, ``max_waiting_cores``, ``max_rounds_factor`` and
    ``max_quiet_wait_s``. Returns the timing and a JSON-able description of its rounds and load.
    """
    sync = device_lib.synchronizer(device) if device is not None else None
    with LoadMonitor() as load:
        timing = time_interleaved(
            variants,
            repeats=cfg.repeats,
            warmup=cfg.warmup,
            sync=sync,
            before_each=before_each,
            max_other_load=cfg.max_waiting_cores,
            max_rounds=cfg.max_rounds_factor * cfg.repeats,
            max_quiet_wait_s=cfg.max_quiet_wait_s,
        )
    info = {
        "load": load.as_dict(),
        "rounds": {
            "run": timing.rounds_run,
            "set_aside": timing.rounds_set_aside,
            "kept_waiting_cores": timing.round_loads,
            "contended": timing.contended,
            "quiet_wait_s": timing.quiet_wait_s,
        },
        "wall_s": timing.wall_s,
    }
    return timing, info


def rounds_text(row: dict) -> str:
    r = row["rounds"]
    return f"{r['run'] - r['set_aside']}/{r['run']}" + ("!" if r["contended"] else "")


# ---------------------------------------------------------------------------- checks and verdicts
def check(name: str, case: str, compared: str, passed: bool, **fields) -> dict:
    """A correctness check record (the same shape as the layer suite's)."""
    return {"name": name, "case": case, "compared": compared, **fields, "passed": bool(passed)}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|)."""
    a, b = a.detach().float(), b.detach().float()
    if a.numel() == 0:
        return 0.0, 0.0
    diff = float((a - b).abs().max())
    return diff, diff / max(float(b.abs().max()), 1e-12)


def verdict(
    target: str,
    case: str,
    stats: dict | None,
    op: str,
    threshold: float,
    text: str,
    **extra,
) -> dict:
    """One target verdict: ``met`` and ``margin`` (> 0: room left; < 0: missed by that fraction) of the
    median of ``stats`` (a :func:`bench.timing.summarize` dict) against ``threshold``."""
    base = {"target": target, "case": case, "text": text, "op": op, "threshold": threshold}
    if stats is None or stats.get("median") is None:
        return {**base, "met": None, "reason": extra.pop("reason", "not measured"), **extra}
    value = stats["median"]
    met = value <= threshold if op == "<=" else value >= threshold
    margin = (threshold / value - 1) if op == "<=" else (value / threshold - 1)
    return {
        **base,
        "value": value,
        "min": stats.get("min"),
        "max": stats.get("max"),
        "met": met,
        "margin": margin,
        **extra,
    }


def not_applicable(target: str, case: str, text: str, reason: str) -> dict:
    return {"target": target, "case": case, "text": text, "met": None, "reason": reason}


# ---------------------------------------------------------------------------- results and tables
def environment(device: torch.device, **extra) -> dict:
    env = device_lib.describe(device)
    env.update(extra)
    return env


def finish(result: dict, start: float) -> dict:
    result["all_checks_passed"] = all(c["passed"] for c in result.get("checks", []))
    result["wall_s"] = time.perf_counter() - start
    return result


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def header_lines(title: str, result: dict) -> list[str]:
    env = result["environment"]
    where = env.get("gpu") or env.get("cpu")
    line = f"{title} on {env['device']} ({where}, {env['torch_threads']} threads, torch {env['torch']})"
    if env.get("moe_expert_path"):
        line += f"; MoE expert path measured: {', '.join(env['moe_expert_path'])}"
    lines = [line]
    load = env.get("load")
    cfg = result.get("config", {})
    if load is not None:
        lines.append(
            f"contention over the run: our threads waited for a CPU {fmt(load['waiting_cores'], '.2f')} cores, "
            f"other processes kept {fmt(load['other_cores_busy'], '.2f')} of {load['cores']} cores busy"
            + (
                ""
                if "max_waiting_cores" not in cfg
                else "; contention control off: every round kept"
                if cfg["max_waiting_cores"] is None
                else f"; rounds with waiting > {cfg['max_waiting_cores']:.2f} cores are set aside "
                "(column 'rounds': clean/run, '!' = too few clean rounds, loaded ones kept)"
            )
        )
    return lines


def checks_lines(checks: list[dict]) -> list[str]:
    failed = [c for c in checks if not c["passed"]]
    lines = [f"correctness checks: {len(checks) - len(failed)}/{len(checks)} passed"]
    for c in failed:
        detail = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in c.items()
            if k not in ("name", "case", "compared", "passed")
        )
        lines.append(f"  FAILED {c['name']} {c['case']}: {c['compared']} ({detail})")
    return lines


def verdict_lines(verdicts: list[dict], width: int = 30) -> list[str]:
    lines = ["targets:"]
    if not verdicts:
        lines.append("  (none for this suite)")
    for v in verdicts:
        if v["met"] is None:
            lines.append(f"  ----  {v['target']:{width}s} {v['case']:22s} {v.get('reason', '')}")
            continue
        word = "met " if v["met"] else "MISS"
        spread = ""
        if v.get("min") is not None and v.get("max") is not None:
            spread = f"; min {v['min']:.3f} max {v['max']:.3f}"
        note = f"; {v['note']}" if v.get("note") else ""
        lines.append(
            f"  {word}  {v['target']:{width}s} {v['case']:22s} {v['value']:.3f} {v['op']} {v['threshold']:.3f}"
            f"  (margin {v['margin']:+.1%}{spread}{note})"
        )
    return lines
