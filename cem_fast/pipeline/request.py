"""What the caller asked for, in one object: the arguments every step of a run is handed on with."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from ..options import RunOptions, TaskOptions


@dataclass(frozen=True)
class RunRequest:
    """A run as asked: ``model`` (module, or a name / path / spec to load), ``image`` (path, array or tensor),
    ``task`` (name or Task), ``rois`` (one ROI or a list) or ``roi_grid`` (every tile of that many px), ``patches``
    (None for the shipped bank, a folder or a PatchBank), the checked options, and the names results carry."""

    model: Any
    image: Any
    task: Any
    rois: Union[Any, Sequence[Any], None]
    roi_grid: Optional[int] = None
    patches: Union[None, str, os.PathLike, Any] = None
    options: RunOptions = RunOptions()
    task_options: TaskOptions = TaskOptions()
    model_name: Optional[str] = None
    image_name: Optional[str] = None

    def replace(self, **changes: Any) -> "RunRequest":
        return dataclasses.replace(self, **changes)
