"""The kinds of node parts `prepare-merge` joins, each with the merge and the summary of the
prepare command that wrote it. The prepare commands write parts through data_pipelines.node_parts
and know nothing of this list, so the merge depends on them and never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from data_pipelines.image import merge as image_merge
from data_pipelines.image import prepare as image_prepare
from data_pipelines.text import merge as text_merge
from data_pipelines.text import prepare as text_prepare

# part kind -> (merged manifest from the directory and its parts, summary of a manifest written)
PART_KINDS: dict[str, tuple[Callable[..., dict[str, Any]], Callable[..., str]]] = {
    text_prepare.PART_KIND: (text_merge.merged_manifest, text_prepare.format_summary),
    image_prepare.PART_KIND: (image_merge.merged_manifest, image_prepare.format_summary),
}
