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
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from moe_llava.data.manifest import ManifestEntry, ManifestWriter, manifest_format
from moe_llava.data.validation import RecordCheck, Validator, iter_checks
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
    checks = iter_checks(manifest, validator, workers=workers, progress=progress)
    result = _split(checks, _outputs(manifest, Path(out_dir)))
    _write_counts(result, manifest, max_rejected_fraction, validator.settings())
    if progress:
        print(result.summary(), file=sys.stderr)
    _check_rejections(result, manifest, max_rejected_fraction)
    return result


def _outputs(manifest: Path, out_dir: Path) -> PrepareResult:
    """The (empty) result naming the output files; the cleaned manifest keeps the input's format."""
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = ".jsonl" if manifest_format(manifest) == "jsonl" else ".json"
    return PrepareResult(
        out_dir / f"manifest{suffix}", out_dir / "quarantine.jsonl", out_dir / "counts.json", 0, 0, 0
    )


def _split(checks: Iterable[tuple[ManifestEntry, RecordCheck]], outputs: PrepareResult) -> PrepareResult:
    """Write each kept record (as repaired) to the cleaned manifest and each rejected one to the
    quarantine; the result counts them, per reason and per repair."""
    reasons: Counter = Counter()
    fixed: Counter = Counter()
    with ManifestWriter(outputs.manifest) as clean, ManifestWriter(outputs.quarantine) as quarantine:
        for entry, check in checks:
            if check.ok:
                clean.write(entry.record if check.record is None else check.record)
                fixed.update(check.fixes)
            else:
                reasons.update(check.reasons)
                quarantine.write(_quarantined(entry, check))
    return replace(
        outputs,
        total=clean.count + quarantine.count,
        kept=clean.count,
        rejected=quarantine.count,
        reasons=dict(sorted(reasons.items())),
        fixed=dict(sorted(fixed.items())),
    )


def _quarantined(entry: ManifestEntry, check: RecordCheck) -> dict:
    """A quarantine line: where the record is, why it was rejected, and the record as it was."""
    return {
        "index": check.index,
        "line": check.line,
        "location": check.location,
        "id": check.id,
        "reasons": check.reasons,
        "issues": [issue.to_dict() for issue in check.issues],
        "record": entry.record,
    }


def _write_counts(
    result: PrepareResult, manifest: Path, max_rejected_fraction: float, settings: dict
) -> None:
    counts = {
        "source": str(manifest),
        "total": result.total,
        "kept": result.kept,
        "rejected": result.rejected,
        "rejected_fraction": round(result.rejected_fraction, 6),
        "max_rejected_fraction": max_rejected_fraction,
        "reasons": result.reasons,
        "fixed": result.fixed,
        "settings": settings,
    }
    result.counts_file.write_text(json.dumps(counts, indent=2) + "\n", encoding="utf-8")


def _check_rejections(result: PrepareResult, manifest: Path, max_rejected_fraction: float) -> None:
    """Refuse an empty dataset, one with no record kept, or one above the rejected fraction."""
    if result.total == 0:
        raise DataError("the manifest has no records (an empty dataset)", file=manifest)
    if result.kept == 0:
        raise RejectedFractionError(
            f"all {result.total} records were rejected; see {result.quarantine}", file=manifest
        )
    if result.rejected_fraction > max_rejected_fraction:
        raise RejectedFractionError(
            f"{result.rejected} of {result.total} records rejected ({100 * result.rejected_fraction:.2f}%), "
            f"above the threshold {100 * max_rejected_fraction:.2f}% (max_rejected_fraction); "
            f"reasons {result.reasons}; see {result.quarantine}",
            file=manifest,
        )
