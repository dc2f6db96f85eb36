import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from app.api.deps import SessionDep, SettingsDep, get_backend
from app.api.errors import error_responses
from app.schemas import ClassifyRequest, ClassifyResponse, PredictionOut, TopLabelOut
from app.services.classify import classify_texts
from app.services.metrics import backend_name

router = APIRouter(tags=["classify"])


@router.post("/classify", response_model=ClassifyResponse, responses=error_responses(400, 404, 413, 422, 503))
def classify(body: ClassifyRequest, session: SessionDep, settings: SettingsDep,
             backend: Annotated[object, Depends(get_backend)], request: Request) -> ClassifyResponse:
    """Classify one or more dialogues (turns joined by [SEP]) with a fine-tuned model.

    ``mode="score"`` ranks the model's own labels, so every answer is a valid label;
    ``mode="generate"`` decodes free text as the upstream pipeline did and reports unparseable output.
    """
    started = time.perf_counter()
    texts = body.all_texts
    strategy = (body.strategy or settings.classify_strategy) if body.mode == "score" else None
    predictions = classify_texts(session, settings, backend, model=body.model, texts=texts,
                                 single=body.texts is None, labels=body.labels, mode=body.mode, top_k=body.top_k,
                                 strategy=strategy)
    seconds = time.perf_counter() - started
    request.app.state.metrics.observe_classify(body.model, backend_name(backend), len(texts), seconds)
    return ClassifyResponse(
        model=body.model, mode=body.mode, strategy=strategy, latency_ms=round(seconds * 1000, 2),
        predictions=[
            PredictionOut(text=text, intent_id=p.intent_id, label=p.label, confidence=p.confidence,
                          top_k=[TopLabelOut(intent_id=t.intent_id, label=t.label, score=t.score) for t in p.top_k],
                          raw_output=p.raw_output, parsed=p.intent_id is not None, latency_ms=p.latency_ms)
            for text, p in zip(texts, predictions)
        ],
    )
