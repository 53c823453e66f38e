"""The registered model, its aliases and their history: register (with the gate), promote, rollback.

Aliases:

- ``challenger``: the most recently registered version that did not become champion;
- ``champion``: the version that is served (``models:/moe-llava@champion``).

Rules the code keeps (and the tests assert):

- the champion alias is only ever *moved* (MLflow's set-alias is a single update), never
  deleted, so a registry that has a champion never goes without one;
- every alias move is recorded on the versions involved, in the version tag ``alias_history``
  (JSON list of ``{time, alias, action, reason, ...}``), with ``promotion_reason`` / ``promoted_at``
  on the new champion;
- the sequence of champions is kept explicitly in the registered model's tag
  ``champion_history`` (JSON list of versions, oldest first): a rollback pops the current
  champion and restores the one before it, so repeated rollbacks go further back; with nothing
  before it, rollback refuses and changes nothing;
- registrations, promotions and rollbacks run one at a time, across processes and machines: each
  holds the registry's lock (:meth:`ModelRegistry.locked`) from reading the champion to its last
  tag, so two racing ones never interleave and the gate always judges against the champion that
  is about to be replaced. Promoting the champion again changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from moe_llava.errors import RegistryBusy, UserError
from moe_llava.registry.gate import GateDecision, GateSettings, decide, numeric_metrics

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"  # registered model tag
ALIAS_HISTORY_TAG = "alias_history"  # model version tag
# Versions registered before metrics went onto the logged model kept them in tags: read as a fallback.
LEGACY_METRICS_TAG = "metrics"  # the whole metrics dict as JSON
LEGACY_METRIC_TAG_PREFIX = "metric."
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit on the metrics of one log_batch
LOCK_SUFFIX = ".lock"  # the registry's lock: a registered model named <model_name>.lock
LOCK_WAIT_S = 60.0


@dataclass
class RegistrationResult:
    model_name: str
    version: str
    model_uri: str
    decision: GateDecision
    aliases: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "version": self.version,
            "model_uri": self.model_uri,
            "aliases": self.aliases,
            "champion": CHAMPION in self.aliases,
            "decision": self.decision.as_dict(),
        }


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ModelRegistry:
    """One registered model in an MLflow registry (``tracking_uri`` also serves as registry URI)."""

    def __init__(
        self,
        model_name: str,
        gate: GateSettings | None = None,
        *,
        tracking_uri: str | None = None,
        lock_wait_s: float = LOCK_WAIT_S,
    ):
        from mlflow.tracking import MlflowClient

        self.model_name = model_name
        self.gate = gate or GateSettings()
        self.lock_wait_s = lock_wait_s
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # ---- reading -------------------------------------------------------------------------------

    def exists(self) -> bool:
        return self._registered_model(required=False) is not None

    def aliases(self) -> dict[str, str]:
        """alias -> version."""
        model = self._registered_model(required=False)
        return {} if model is None else {a: str(v) for a, v in (model.aliases or {}).items()}

    def champion(self) -> str | None:
        return self.aliases().get(CHAMPION)

    def challenger(self) -> str | None:
        return self.aliases().get(CHALLENGER)

    def version_metrics(self, version: str) -> dict[str, Any]:
        """The metrics of ``version``'s logged model (the latest value of each name), where
        :meth:`register` and :meth:`add_metrics` log them; the gate reads every version this way."""
        mv = self._version(version)
        model_id = _model_id(mv)
        logged = self.client.get_logged_model(model_id).metrics if model_id else None
        if logged:
            latest = sorted(logged, key=lambda m: (m.timestamp, m.step))
            return {m.key: m.value for m in latest}
        return _legacy_tag_metrics(mv.tags)

    def alias_history(self, version: str) -> list[dict[str, Any]]:
        return _json_list(self._version(version).tags.get(ALIAS_HISTORY_TAG))

    def champion_history(self) -> list[str]:
        """Versions that were champion, oldest first; the last one is the current champion."""
        model = self._registered_model(required=False)
        if model is None:
            return []
        history = [str(v) for v in _json_list((model.tags or {}).get(HISTORY_TAG))]
        champion = (model.aliases or {}).get(CHAMPION)
        if champion is not None and (not history or history[-1] != str(champion)):
            history.append(str(champion))  # the alias was moved outside this tool: adopt it
        return history

    def describe(self) -> dict[str, Any]:
        """Versions (newest first) with aliases, gate metric value and decision, plus the champion history."""
        if not self.exists():
            return {"model_name": self.model_name, "exists": False, "versions": []}
        aliases = self.aliases()
        by_version: dict[str, list[str]] = {}
        for alias, version in aliases.items():
            by_version.setdefault(version, []).append(alias)
        versions = self.client.search_model_versions(f"name = '{_quote(self.model_name)}'")
        rows = []
        for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
            metrics = self.version_metrics(mv.version)
            rows.append(
                {
                    "version": str(mv.version),
                    "aliases": sorted(by_version.get(str(mv.version), [])),
                    "gate_metric": self.gate.metric,
                    "gate_value": metrics.get(self.gate.metric),
                    "gate_decision": mv.tags.get("gate.decision"),
                    "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(
                        timespec="seconds"
                    ),
                    "run_id": mv.run_id,
                    "git_commit": mv.tags.get("git_commit"),
                    "promotion_reason": mv.tags.get("promotion_reason"),
                }
            )
        return {
            "model_name": self.model_name,
            "exists": True,
            "aliases": aliases,
            "champion_history": self.champion_history(),
            "gate": {
                "metric": self.gate.metric,
                "direction": self.gate.direction,
                "min_margin": self.gate.min_margin,
            },
            "versions": rows,
        }

    # ---- writing -------------------------------------------------------------------------------

    def register(
        self,
        model_uri: str,
        metrics: Mapping[str, Any],
        *,
        run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        apply_gate: bool = True,
    ) -> RegistrationResult:
        """Create a version from the logged model ``model_uri`` (``models:/m-...``, one per version)
        with ``tags``; ``metrics`` are logged on that model through run ``run_id`` (default: the
        model's run), which records them too. It becomes challenger, then champion if the gate
        passes (or if there is no champion yet)."""
        model = self._logged_model(model_uri)
        run_id = run_id or model.source_run_id
        self._log_model_metrics(model.model_id, run_id, metrics)
        version_tags = {str(k): str(v) for k, v in (tags or {}).items() if v is not None}
        self._ensure_registered_model()
        mv = self.client.create_model_version(
            self.model_name, source=model_uri, run_id=run_id, tags=version_tags, model_id=model.model_id
        )
        with self.locked():
            return self._judge(str(mv.version), apply_gate)

    def _judge(self, version: str, apply_gate: bool) -> RegistrationResult:
        """The gate's decision on a new version against the current champion, and the aliases it moves;
        both versions' metrics read the same way."""
        champion = self.champion()
        decision = decide(
            self.gate,
            self.version_metrics(version),
            champion,
            self.version_metrics(champion) if champion is not None else None,
        )
        if not apply_gate:
            decision = replace(
                decision, promote=False, reason="gate not applied (--no-gate): stays challenger"
            )
        self._set_tag(version, "gate.decision", "champion" if decision.promote else "challenger")
        self._set_tag(version, "gate.reason", decision.reason)  # names the metric, both values, the margin
        self._move_alias(CHALLENGER, version, f"registered: {decision.reason}", by="register")
        if decision.promote:
            self._set_champion(version, f"gate: {decision.reason}", by="gate")
        return RegistrationResult(
            self.model_name,
            version,
            f"models:/{self.model_name}/{version}",
            decision,
            self._aliases_of(version),
        )

    def add_metrics(
        self,
        version: str | int,
        metrics: Mapping[str, Any],
        *,
        run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Log ``metrics`` measured later (e.g. ``moe-llava eval benchmark``'s ``lmms/...``) on a
        version's logged model through run ``run_id`` (default: the version's run), where the gate
        reads them (a new value replaces the old one of that name), and set ``tags``; returns the
        version's metrics. Logged metrics are only ever added, so two merges never lose each other's."""
        version = str(version)
        mv = self._version(version)
        model_id = _model_id(mv)
        if not model_id:
            raise UserError(f"v{version} of {self.model_name!r} has no logged model to log metrics on")
        self._log_model_metrics(model_id, run_id or mv.run_id, metrics)
        for key, value in (tags or {}).items():
            if value is not None:
                self._set_tag(version, str(key), str(value))
        return self.version_metrics(version)

    def promote(self, version: str | int, reason: str | None = None) -> dict[str, Any]:
        """Make ``version`` champion by hand (whatever the gate says)."""
        version = str(version)
        self._version(version)  # exists?
        with self.locked():
            previous = self.champion()
            if previous == version:
                return {
                    "changed": False,
                    "champion": version,
                    "message": f"v{version} is already the champion",
                }
            self._set_champion(version, reason or "promoted by hand", by="promote")
        return {"changed": True, "champion": version, "previous_champion": previous, "reason": reason}

    def rollback(self, reason: str | None = None) -> dict[str, Any]:
        """Give ``champion`` back to the previous champion; repeated rollbacks go further back."""
        self._registered_model(required=True)
        with self.locked():
            return self._rollback(reason)

    def _rollback(self, reason: str | None) -> dict[str, Any]:
        """The rollback itself (under the lock)."""
        history = self.champion_history()
        if not history:
            raise UserError(f"nothing to roll back: registered model {self.model_name!r} has no champion")
        current = history.pop()
        while history and not self._version_exists(history[-1]):
            history.pop()  # a deleted version cannot come back
        if not history:
            raise UserError(
                f"nothing to roll back to: v{current} is the first champion of {self.model_name!r} "
                f"(no earlier champion left in the history)"
            )
        target = history[-1]
        reason = reason or "rollback"
        stamp = self._set_champion(
            target,
            f"rollback: {reason}",
            by="rollback",
            history=history,
            promotion_reason=f"rollback from v{current}: {reason}",
        )
        self._set_tag(current, "rolled_back_at", stamp)
        return {"changed": True, "champion": target, "previous_champion": current, "reason": reason}

    @contextlib.contextmanager
    def locked(self):
        """Hold the registry's lock for the block: the registered model ``<model_name>.lock``.

        Every store, SQLite or server, refuses a second registered model of the same name, so only
        one process at a time can create it; the others wait (up to ``lock_wait_s``, then
        :class:`RegistryBusy` names the holder). The block ending, by error or Ctrl-C included,
        deletes it; only a process killed outright inside the block leaves it, for a person to delete.
        """
        from mlflow.exceptions import MlflowException

        lock = self.model_name + LOCK_SUFFIX
        holder = f"{socket.gethostname()} pid {os.getpid()}"
        deadline = time.monotonic() + self.lock_wait_s
        while True:
            try:
                self.client.create_registered_model(
                    lock,
                    tags={"holder": holder, "since": now()},
                    description=f"lock of {self.model_name!r}: a registration or promotion is running",
                )
                break
            except MlflowException as err:
                # Taken; or just released: MLflow's SQL store, refused the name, looks the holder's
                # lock up for its message and may find it gone (RESOURCE_DOES_NOT_EXIST).
                if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                    raise
            if time.monotonic() > deadline:
                tags = self._lock_tags(lock)
                raise RegistryBusy(
                    f"registered model {self.model_name!r}: its lock {lock!r} is held by "
                    f"{tags.get('holder', '?')} since {tags.get('since', '?')} (waited {self.lock_wait_s:g} s); "
                    f"if that process is gone, delete the registered model {lock!r} and try again"
                )
            time.sleep(random.uniform(0.02, 0.1))  # jitter: waiters do not retry in lockstep
        try:
            yield
        finally:
            self.client.delete_registered_model(lock)

    # ---- internals -----------------------------------------------------------------------------

    def _lock_tags(self, lock: str) -> dict[str, str]:
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.client.get_registered_model(lock).tags or {})
        except MlflowException:
            return {}  # released meanwhile

    def _set_champion(
        self,
        version: str,
        reason: str,
        *,
        by: str,
        history: list[str] | None = None,
        promotion_reason: str | None = None,
    ) -> str:
        """Move ``champion`` to ``version`` and record it (on both versions, in the history); the stamp.

        ``history``: the champion history to save (default: the current one plus ``version``; a
        rollback passes the history without the champion it removes). A champion is no longer a
        challenger.
        """
        history = [*self.champion_history(), version] if history is None else history
        stamp = now()
        # Move first: the alias goes from the old champion to the new one in one update.
        self._move_alias(CHAMPION, version, reason, by=by, stamp=stamp)
        self._set_tag(version, "promotion_reason", promotion_reason or reason)
        self._set_tag(version, "promoted_at", stamp)
        self._save_history(history)
        if self.challenger() == version:
            self.client.delete_registered_model_alias(self.model_name, CHALLENGER)
            self._record(version, CHALLENGER, "removed", f"became champion ({by})", stamp, by=by)
        return stamp

    def _move_alias(
        self, alias: str, version: str, reason: str, *, by: str, stamp: str | None = None
    ) -> None:
        """Point ``alias`` at ``version`` (one update) and record the move on the versions involved."""
        previous = self.aliases().get(alias)
        stamp = stamp or now()
        self.client.set_registered_model_alias(self.model_name, alias, version)
        self._record(version, alias, "set", reason, stamp, by=by, previous=previous)
        if previous is not None and previous != version:
            self._record(previous, alias, "removed", reason, stamp, by=by, replaced_by=version)

    def _record(self, version: str, alias: str, action: str, reason: str, stamp: str, **extra: Any) -> None:
        event = {"time": stamp, "alias": alias, "action": action, "reason": reason}
        event.update({k: v for k, v in extra.items() if v is not None})
        events = [*self.alias_history(version), event]
        self._set_tag(version, ALIAS_HISTORY_TAG, json.dumps(events))

    def _save_history(self, history: list[str]) -> None:
        self.client.set_registered_model_tag(
            self.model_name, HISTORY_TAG, json.dumps([str(v) for v in history])
        )

    def _logged_model(self, model_uri: str):
        from mlflow.exceptions import MlflowException

        model_id = model_uri.removeprefix("models:/")
        if not model_id.startswith("m-"):
            raise UserError(f"{model_uri}: expected a logged model URI (models:/m-...), one per version")
        try:
            return self.client.get_logged_model(model_id)
        except MlflowException as err:
            raise UserError(f"{model_uri}: no such logged model ({err.message})") from None

    def _log_model_metrics(self, model_id: str, run_id: str, metrics: Mapping[str, Any]) -> None:
        """The numeric ``metrics`` on logged model ``model_id`` and on run ``run_id``, in one go."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(k, v, stamp, 0, model_id=model_id) for k, v in numeric_metrics(metrics).items()]
        for start in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=items[start : start + MAX_METRICS_PER_BATCH])

    def _set_tag(self, version: str, key: str, value: str) -> None:
        self.client.set_model_version_tag(self.model_name, version, key, value)

    def _aliases_of(self, version: str) -> list[str]:
        return sorted(a for a, v in self.aliases().items() if v == version)

    def _ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        if self._registered_model(required=False) is not None:
            return
        try:
            self.client.create_registered_model(
                self.model_name, description="MoE-LLaVA (moe-tuning): one version per pipeline run"
            )
        except MlflowException as err:  # created concurrently
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    def _registered_model(self, *, required: bool = True):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(self.model_name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            if required:
                raise UserError(
                    f"no registered model {self.model_name!r} in this registry (register a model first)"
                ) from None
            return None

    def _version(self, version: str | int):
        from mlflow.exceptions import MlflowException

        self._registered_model(required=True)
        try:
            return self.client.get_model_version(self.model_name, str(version))
        except MlflowException as err:
            if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            raise UserError(f"registered model {self.model_name!r} has no version {version!r}") from None

    def _version_exists(self, version: str) -> bool:
        try:
            self._version(version)
        except ValueError:
            return False
        return True


def _model_id(mv) -> str | None:
    """The logged model of a version: the SQL registry keeps its source ``models:/m-...``, not its id."""
    if mv.model_id:
        return mv.model_id
    source = str(mv.source or "")
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def _legacy_tag_metrics(tags: Mapping[str, str]) -> dict[str, Any]:
    if LEGACY_METRICS_TAG in tags:
        with contextlib.suppress(ValueError, TypeError):
            return dict(json.loads(tags[LEGACY_METRICS_TAG]))
    prefix = LEGACY_METRIC_TAG_PREFIX
    return {k[len(prefix) :]: v for k, v in tags.items() if k.startswith(prefix)}


def _json_list(text: str | None) -> list[Any]:
    if not text:
        return []
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def _quote(name: str) -> str:
    return name.replace("'", "\\'")
