"""Request and response bodies of the HTTP API (they are the OpenAPI reference)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_K = 1000
DEFAULT_K = 10
MAX_CODE_CHARS = 20_000


K_HELP = f"number of neighbours (1..{MAX_K}); default {DEFAULT_K}, or with radius: at most this many of them"
RADIUS_HELP = f"all items within this Hamming distance (at most the code length; at most k, else {MAX_K}, are listed)"


class SearchByCode(BaseModel):
    """Search with a code instead of an image: hex (`0x` optional) or a string of 0/1 bits."""

    model_config = ConfigDict(extra="forbid")

    # the served index's code length sets the example and the pattern (`routers.search.document_examples`)
    code: str = Field(..., min_length=1, max_length=MAX_CODE_CHARS, description="hex, or one 0/1 character per bit")
    k: int | None = Field(None, ge=1, le=MAX_K, description=K_HELP)
    radius: int | None = Field(None, ge=0, description=RADIUS_HELP)

    @field_validator("k", "radius", mode="before")
    @classmethod
    def json_integer(cls, value: object) -> object:
        """A JSON integer (2, or 2.0: JSON Schema counts both), never true/false or a string ("2")."""
        if value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("must be a JSON integer (not true/false, a string or a fraction)")
        return int(value)


class SearchParams(BaseModel):
    """k / radius as sent with an image upload (form fields or query parameters)."""

    k: int | None = Field(None, ge=1, le=MAX_K)
    radius: int | None = Field(None, ge=0)


class Timings(BaseModel):
    decode_ms: float = Field(..., description="reading and decoding the upload (or parsing the code)")
    encode_ms: float = Field(..., description="running the model (0 for a code query)")
    search_ms: float = Field(..., description="Hamming search plus metadata look-up")
    total_ms: float = Field(..., description="from the request body received to the answer built")


class Neighbour(BaseModel):
    id: int
    distance: int = Field(..., description="Hamming distance to the query code")
    labels: list[str]
    source: str
    thumbnail_url: str


class SearchResponse(BaseModel):
    query_code: str = Field(..., description="the query's code, hex")
    bits: int
    k: int | None
    radius: int | None
    total_within_radius: int | None = Field(None, description="for radius queries: all matches, of which at most 1000 are listed")
    close_match: bool = Field(..., description="whether the nearest result is within far_distance; false: nothing in "
                                               "the index is close, the results are only the least far")
    far_distance: int = Field(..., description="99 % of the indexed items have another item this close or closer "
                                               "(the index's own nearest-neighbour distances)")
    results: list[Neighbour]
    timings: Timings


class Item(BaseModel):
    id: int
    labels: list[str]
    source: str
    code: str = Field(..., description="packed code, hex")
    thumbnail_url: str | None


class Deleted(BaseModel):
    id: int
    deleted: bool = True
    items: int = Field(..., description="items left in the index")


class Health(BaseModel):
    status: str = "ok"
    items: int


class Stats(BaseModel):
    items: int
    bits: int
    index_kind: str
    model_id: str
    class_names: list[str]
    read_only: bool
    max_upload_bytes: int
    max_image_pixels: int = Field(..., description="decoded pixels an upload may have (after JPEG's reduced decode)")
    decode_budget_bytes: int = Field(..., description="memory that uploads being read and decoded may hold at once")
    decode_workers: int
    request_timeout_s: float


class ErrorBody(BaseModel):
    detail: str | list
