"""Parameter schema pieces several operators share. A private helper module: it registers no operator."""
from __future__ import annotations

from typing import Annotated, Optional

from pydantic import Field, FiniteFloat, field_validator

from .operator import OpParams

# one weight per model, any finite float (negative ones allowed)
Weights = Optional[list[FiniteFloat]]


def weights_field(description: str = "one weight per model"):
    """A per-model ``weights`` parameter whose default is 1.0 for each model."""
    return Field(None, description=description, json_schema_extra={"default_text": "1.0 each"})


class NormalisedWeights(OpParams):
    """Params whose ``weights`` are αᵢ >= 0 with a positive sum, normalised to sum 1 (karcher, fisher_merge)."""

    weights: Optional[list[Annotated[float, Field(ge=0.0, allow_inf_nan=False)]]] = weights_field(
        "one weight αᵢ >= 0 per model, normalised to sum 1"
    )

    @field_validator("weights")
    @classmethod
    def _positive_sum(cls, v: Optional[list[float]]) -> Optional[list[float]]:
        if v is not None and not sum(v) > 0:
            raise ValueError("weights must have a positive sum")
        return v
