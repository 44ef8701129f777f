"""Ask the current global model a question about an image (when this process has the model)."""

from __future__ import annotations

import base64
import binascii
import io

from fastapi import APIRouter, HTTPException, status
from PIL import Image, UnidentifiedImageError

from cloud import aggregation
from cloud.api.deps import OperatorDep, SessionDep, StateDep
from cloud.api.schemas import MAX_ASK_IMAGE_BYTES, AskAnswer, AskRequest, CandidatePublic
from cloud.ask import VersionLoadError
from cloud.db import crud

router = APIRouter(prefix="/ask", tags=["ask"])
MAX_IMAGE_SIDE = 4096


def _unprocessable(field: str, message: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                         [{"loc": ["body", field], "msg": message, "type": "value_error"}])


def decode_image(data: str) -> Image.Image:
    """A base64 image (a ``data:`` URL prefix is allowed) -> an RGB PIL image, or a 422."""
    data = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise _unprocessable("image_base64", f"not base64: {err}") from err
    if len(raw) > MAX_ASK_IMAGE_BYTES:
        raise _unprocessable("image_base64", f"image is {len(raw)} bytes, the limit is "
                             f"{MAX_ASK_IMAGE_BYTES}")
    try:
        image = Image.open(io.BytesIO(raw))
        if max(image.size) > MAX_IMAGE_SIDE:
            raise _unprocessable("image_base64", f"image is {image.size[0]}x{image.size[1]}, "
                                 f"at most {MAX_IMAGE_SIDE} pixels a side")
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise _unprocessable("image_base64", f"not a readable image: {err}") from err


@router.post("", response_model=AskAnswer, responses={
    409: {"description": "no global version yet, or it does not fit the loaded model"},
    503: {"description": "this process has no model loaded"}})
def ask(body: AskRequest, session: SessionDep, _: OperatorDep, state: StateDep) -> AskAnswer:
    """The current global version's answer: closed-answer candidates ranked by probability
    (what the evaluator scores) and a short greedy free-text answer."""
    if state.answerer is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "no model is loaded in this process: run the all-in-one "
                            "`fednano cloud serve` (or `fednano cloud api --ask`)")
    if not body.question.strip():
        raise _unprocessable("question", "the question is blank")
    image = decode_image(body.image_base64)
    version = crud.latest_adapter_version(session)
    if version is None:
        raise HTTPException(status.HTTP_409_CONFLICT, "no global adapter version exists yet")
    try:
        answer = state.answerer.answer(image, body.question, version=str(version.id),
                                       load_state=lambda: aggregation.load_state(state.blobs,
                                                                                 version))
    except VersionLoadError as err:
        raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from err
    return AskAnswer(answer=answer.text, best_candidate=answer.best,
                     candidates=[CandidatePublic(answer=c.answer, probability=c.probability)
                                 for c in answer.candidates],
                     version_id=version.id, elapsed_ms=answer.elapsed_ms)
