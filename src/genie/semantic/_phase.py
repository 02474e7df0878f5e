"""Prefill or decode: how many new queries attend over how long a cache.

Prefill runs the prompt, with nothing cached before it (query length = key length). Decode runs a
few new tokens against a cache that already holds the past (query length < key length).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from genie.semantic._patterns import Match

DECODE_MAX_QUERY = 16  # more new tokens than this over a cache is chunked prefill, not decode


class Phase(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    NONE = "none"  # not a sequence model

    def __str__(self) -> str:
        return self.value


def detect_phase(matches: Sequence[Match], decode_max_query: int = DECODE_MAX_QUERY) -> tuple[Phase, dict]:
    attn = [m for m in matches if m.kind == "attention" and m.get("q_len") is not None]
    caches = [m for m in matches if m.kind == "kv_cache_update"]
    if not attn:
        return Phase.NONE, {}
    q_len = max(m["q_len"] for m in attn)
    kv_len = max(m["kv_len"] for m in attn)
    known = [m["past_len"] for m in caches if m.get("past_len") is not None]
    past = max(known) if known else kv_len - q_len
    ev = {"q_len": q_len, "kv_len": kv_len, "past_len": past, "cache_updates": len(caches)}
    if past <= 0:
        return Phase.PREFILL, ev
    if q_len <= decode_max_query:
        return Phase.DECODE, ev
    return Phase.PREFILL, {**ev, "chunked": True}
