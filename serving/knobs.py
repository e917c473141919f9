"""The knobs a controller sets, each bound declared once: campaign files, the control API, the policies, the engine
configs and the node agent validate against these and word a refusal alike. Imports nothing of ours (workloads/ may)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidatorFunctionWrapHandler, model_validator
from pydantic_core import PydanticCustomError

MAX_CLOCK_MHZ = 10_000.0  # no accelerator runs at 10 GHz
MAX_NUM_SEQS = 4096  # batch cap of an engine (concurrent sequences) and of the router's packing
MAX_NUM_BATCHED_TOKENS = 1_048_576  # token budget of one engine step: a million-token prefill at once
MAX_SPECULATIVE_TOKENS = 16  # tokens a speculative step may propose

ClockMHz = Annotated[float, Field(gt=0, le=MAX_CLOCK_MHZ, allow_inf_nan=False)]
NumSeqs = Annotated[int, Field(ge=1, le=MAX_NUM_SEQS)]
BatchedTokens = Annotated[int, Field(ge=1, le=MAX_NUM_BATCHED_TOKENS)]
SpeculativeTokens = Annotated[int, Field(ge=0, le=MAX_SPECULATIVE_TOKENS)]
PackPerReplica = Annotated[int, Field(ge=0, le=MAX_NUM_SEQS)]

ALLOWED = {
    "clock_mhz": f"a finite number of MHz in (0, {MAX_CLOCK_MHZ:g}]",
    "max_num_seqs": f"an integer in [1, {MAX_NUM_SEQS}]",
    "max_num_batched_tokens": f"an integer in [1, {MAX_NUM_BATCHED_TOKENS}]",
    "speculative_tokens": f"an integer in [0, {MAX_SPECULATIVE_TOKENS}] (0: off)",
    "pack_per_replica": f"an integer in [0, {MAX_NUM_SEQS}] (0: spread)",
    "prefix_caching": "true or false",
}  # what each knob accepts, in the words of every refusal


def knob_error_text(err: ValidationError) -> str:
    """One line per refused knob: ``knob clock_mhz: must be a finite number of MHz in (0, 10000], got inf``."""
    lines = []
    for e in err.errors():
        name = str(e["loc"][0]) if e["loc"] else ""
        if name in ALLOWED:
            lines.append(f"knob {name}: must be {ALLOWED[name]}, got {e['input']!r}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"knob {name}: unknown; the knobs are {', '.join(ALLOWED)}")
        else:
            lines.append(f"knobs: {e['msg']}")
    return "; ".join(lines)


class Knobs(BaseModel):
    """Knob settings a controller asks for (or a campaign pins); ``None`` leaves a knob as it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clock_mhz: ClockMHz | None = None
    max_num_seqs: NumSeqs | None = None
    max_num_batched_tokens: BatchedTokens | None = None
    speculative_tokens: SpeculativeTokens | None = None
    """Speculative decoding: tokens proposed per step (by the configured method; n-gram if none); 0: off."""
    pack_per_replica: PackPerReplica | None = None
    """Router admission (batch cap in the router): fill the busiest replica with fewer than this many requests in
    flight before using the next, so replicas left without work draw idle power; 0 spreads the load."""
    prefix_caching: bool | None = None
    """Reuse the KV blocks of prompt prefixes already computed (an engine restart on vLLM); engines without a
    prefix cache ignore it with a note."""

    @model_validator(mode="wrap")
    @classmethod
    def _one_message(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Knobs:
        # Every path (Python, a campaign file, the control API) refuses a knob with the same words.
        try:
            return handler(data)
        except ValidationError as e:
            raise PydanticCustomError("knobs", knob_error_text(e)) from None

    def label(self) -> str:
        """``clock_mhz=1200 max_num_seqs=64``, ``prefix_caching=on``, ``knobs=defaults`` (points.csv ``setting``)."""
        return " ".join(
            f"{k}={('on' if v else 'off') if isinstance(v, bool) else format(v, 'g')}"
            for k, v in self.model_dump(exclude_none=True).items()
        ) or "knobs=defaults"

    @classmethod
    def from_label(cls, label: str) -> Knobs | None:
        """The knobs a :meth:`label` names (None: it names none, e.g. a policy's label)."""
        found = dict(re.findall(rf"\b({'|'.join(ALLOWED)})=([0-9.]+|on|off)\b", label))
        return cls.model_validate(found) if found and not label.startswith("policy=") else None
