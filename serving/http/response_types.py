"""Each API's response media type, worked out once at start-up instead of on every response.

BentoML asks an API's output descriptor for its media type on every response.
For a root model (a list, such as `/predict_batch`'s `list[Prediction]`) it
answers by building the output's whole JSON schema with a fresh pydantic
`TypeAdapter`: about 3 ms of event-loop CPU per request, for an answer that
depends only on the type. Setting the descriptor's `media_type` to that same
answer, once, makes BentoML use it as it stands.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def fix_response_media_types(apis: Iterable[Any]) -> dict[str, str]:
    """Give each API's output descriptor (`api.output_spec`) the media type BentoML would compute for it.

    Streaming APIs are left alone: BentoML sets theirs itself. Returns {API name: media type}.
    """
    fixed = {}
    for api in apis:
        spec = api.output_spec
        if not api.is_stream and spec.media_type is None:
            spec.media_type = spec.mime_type()
        fixed[api.name] = spec.mime_type()
    return fixed
