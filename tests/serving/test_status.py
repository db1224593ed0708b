"""The one table from errors to HTTP status: most specific class first, unknown errors 500, and
what the caller is told (detail, Retry-After)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from raydb.errors import (
    Conflict,
    Forbidden,
    Invalid,
    Overloaded,
    RequestError,
    TimedOut,
    TooLarge,
    Unavailable,
    UnknownResource,
)
from raydb.serving.adapters import (
    AdapterCorrupt,
    AdapterError,
    AdapterGone,
    AdapterMismatch,
    GenerationCancelled,
)
from raydb.serving.limits import BodyTooLarge, TooManyRequests
from raydb.serving.multi_lora import AdapterTooLarge, AdapterUnsupported
from raydb.serving.status import HTTP_STATUS, http_exception, http_status
from raydb.serving.subjects import BadAdapterId, SubjectNotFound, parse_model_id


@pytest.mark.parametrize(("error", "status"), [
    (RequestError("prompt", "too long"), 422), (TooLarge("photos", "big"), 413),
    (Forbidden("photo_uris", "not yours"), 403), (Invalid("Idempotency-Key: 1 to 255 characters"), 422),
    (UnknownResource("unknown training 'x'"), 404), (Conflict("already succeeded"), 409),
    (Overloaded("queue full", retry_after=7), 429), (Unavailable("at capacity", retry_after=1), 503),
    (TimedOut("late"), 504), (BodyTooLarge("request body over 10 bytes"), 413),
    (TooManyRequests("at most 2 requests in flight per tenant", 1.0), 429),
    (SubjectNotFound("unknown subject 'x'"), 404),
    (BadAdapterId("bad adapter id"), 400), (AdapterMismatch("x"), 409), (AdapterTooLarge("x"), 409),
    (AdapterUnsupported("x"), 409), (AdapterCorrupt("x"), 500), (AdapterGone("x"), 503),
    (AdapterError("x"), 500), (GenerationCancelled("x"), 504),
])
def test_each_error_has_its_status(error, status):
    assert http_status(error) == status
    assert http_exception(error).status_code == status


def test_the_most_specific_class_wins_and_unknown_errors_are_500():
    class Bigger(TooLarge):
        pass

    assert http_status(Bigger("photos", "x")) == 413  # a RequestError, but a TooLarge first
    assert http_status(ValueError("a bug")) == 500 and http_status(KeyError("x")) == 500
    assert all(isinstance(s, int) and 400 <= s < 600 for s in HTTP_STATUS.values())


def test_what_the_caller_is_told():
    field = http_exception(TooLarge("photos", "upload of 9 bytes, at most 8"))
    assert field.detail == [{"type": "value_error", "loc": ["body", "photos"],
                             "msg": "upload of 9 bytes, at most 8"}] and field.headers is None
    queue = http_exception(Overloaded("the training queue is full (3 waiting); retry later", retry_after=7))
    assert queue.detail == "the training queue is full (3 waiting); retry later"
    assert queue.headers == {"Retry-After": "7"}
    tenant = http_exception(TooManyRequests("at most 2 requests per second per tenant", 0.2))
    assert tenant.detail == "too many requests: at most 2 requests per second per tenant"
    assert tenant.headers == {"Retry-After": "1"}
    assert http_exception(SubjectNotFound("unknown subject 'rex'")).detail == "unknown subject 'rex'"

    class Body(BaseModel):
        n: int

    with pytest.raises(ValidationError) as err:
        Body.model_validate({"n": "x"})
    answer = http_exception(err.value)
    assert answer.status_code == 422 and answer.detail[0]["loc"] == ["body", "n"]


def test_a_bad_adapter_id_is_its_own_error():
    for bad in ("rex", "rex@v0001", "t1/rex@latest", "../x@v0001", "t1/../x@v0001", "@v0001"):
        with pytest.raises(BadAdapterId):
            parse_model_id(bad)
    assert parse_model_id("t1/rex@v0001") == ("t1", "rex", "v0001")
