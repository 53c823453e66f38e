"""Data preparation: validated manifest in, cleaned manifest + quarantine + counts out.

Nothing is dropped silently: every rejected record goes to ``quarantine.jsonl`` with its reasons,
and ``counts.json`` has the totals per reason. When the rejected fraction exceeds the threshold
the outputs are still written (so the quarantine can be inspected) and
:class:`~moe_llava.errors.RejectedFractionError` is raised.

Outputs in ``out_dir``:

* ``manifest.json`` (or ``.jsonl`` if the input was JSON Lines): the valid records, unchanged or
  as repaired by the ``leading_gpt`` / ``overlength`` policies (:mod:`moe_llava.data.validation`);
* ``quarantine.jsonl``: ``{"index", "line", "location", "id", "reasons", "issues", "record"}`` per
  rejected record (``location``: ``line N`` in JSON Lines, ``record #i`` in a JSON array);
* ``counts.json``: totals, per-reason counts, per-repair counts (``fixed``), the settings used.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from moe_llava.data.manifest import ManifestWriter, manifest_format
from moe_llava.data.validation import Validator, iter_checks
from moe_llava.errors import DataError, RejectedFractionError, UserError

DEFAULT_MAX_REJECTED_FRACTION = 0.05


@dataclass
class PrepareResult:
    manifest: Path  # the cleaned manifest
    quarantine: Path
    counts_file: Path
    total: int
    kept: int
    rejected: int
    reasons: dict[str, int] = field(default_factory=dict)
    fixed: dict[str, int] = field(default_factory=dict)  # kept records repaired, per Fix

    @property
    def rejected_fraction(self) -> float:
        return self.rejected / self.total if self.total else 0.0

    def summary(self) -> str:
        repaired = ", ".join(f"{fix} {count}" for fix, count in sorted(self.fixed.items()))
        lines = [
            f"{self.total} record(s): {self.kept} kept{f' ({repaired})' if repaired else ''}, "
            f"{self.rejected} quarantined ({100 * self.rejected_fraction:.2f}%) -> {self.manifest}"
        ]
        lines += [
            f"  {reason}: {count}"
            for reason, count in sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
        return "\n".join(lines)


def prepare_manifest(
    manifest: str | Path,
    out_dir: str | Path,
    validator: Validator,
    *,
    max_rejected_fraction: float = DEFAULT_MAX_REJECTED_FRACTION,
    workers: int = 1,
    progress: bool = False,
) -> PrepareResult:
    """Validate ``manifest`` and split it into a cleaned manifest and a quarantine file.

    Raises ``RejectedFractionError`` (after writing everything) when more than
    ``max_rejected_fraction`` of the records are rejected, and when no record survives; ``DataError``
    when the manifest has no record at all.
    """
    if not 0.0 <= max_rejected_fraction <= 1.0:
        raise UserError(f"max_rejected_fraction must be in [0, 1], got {max_rejected_fraction}")
    manifest = Path(manifest)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = ".jsonl" if manifest_format(manifest) == "jsonl" else ".json"
    clean_path = out_dir / f"manifest{suffix}"
    quarantine_path = out_dir / "quarantine.jsonl"
    counts_path = out_dir / "counts.json"
    reasons: Counter = Counter()
    fixed: Counter = Counter()
    total = kept = 0
    with ManifestWriter(clean_path) as clean, ManifestWriter(quarantine_path) as quarantine:
        for entry, check in iter_checks(manifest, validator, workers=workers, progress=progress):
            total += 1
            if check.ok:
                clean.write(entry.record if check.record is None else check.record)
                fixed.update(check.fixes)
                kept += 1
                continue
            reasons.update(check.reasons)
            quarantine.write(
                {
                    "index": check.index,
                    "line": check.line,
                    "location": check.location,
                    "id": check.id,
                    "reasons": check.reasons,
                    "issues": [issue.to_dict() for issue in check.issues],
                    "record": entry.record,
                }
            )
    result = PrepareResult(
        clean_path,
        quarantine_path,
        counts_path,
        total,
        kept,
        total - kept,
        dict(sorted(reasons.items())),
        dict(sorted(fixed.items())),
    )
    counts = {
        "source": str(manifest),
        "total": total,
        "kept": kept,
        "rejected": result.rejected,
        "rejected_fraction": round(result.rejected_fraction, 6),
        "max_rejected_fraction": max_rejected_fraction,
        "reasons": result.reasons,
        "fixed": result.fixed,
        "settings": validator.settings(),
    }
    counts_path.write_text(json.dumps(counts, indent=2) + "\n", encoding="utf-8")
    if progress:
        print(result.summary(), file=sys.stderr)
    if total == 0:
        raise DataError("the manifest has no records (an empty dataset)", file=manifest)
    if kept == 0:
        raise RejectedFractionError(
            f"all {total} records were rejected; see {quarantine_path}", file=manifest
        )
    if result.rejected_fraction > max_rejected_fraction:
        raise RejectedFractionError(
            f"{result.rejected} of {total} records rejected ({100 * result.rejected_fraction:.2f}%), above the "
            f"threshold {100 * max_rejected_fraction:.2f}% (max_rejected_fraction); reasons {result.reasons}; "
            f"see {quarantine_path}",
            file=manifest,
        )
    return result
