"""The Prefect side of `tasks.stage_task`, imported only when a stage task is built (never by planning)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect.cache_policies import CachePolicy

from tasks.stage_task import StageCachePolicy


@dataclass
class PrefectStageCachePolicy(CachePolicy):
    """Prefect's face of `StageCachePolicy`: the key is the rule's (None: run the task)."""

    rule: StageCachePolicy = field(default_factory=StageCachePolicy)

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        return self.rule.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
