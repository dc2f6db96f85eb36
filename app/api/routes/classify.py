import time
from typing import Annotated

from fastapi import APIRouter, Depends

from app.api.deps import SessionDep, SettingsDep, get_registry
from app.schemas import ClassifyRequest, ClassifyResponse, PredictionOut, TopLabelOut
from app.services.models import resolve_model_ref

router = APIRouter(tags=["classify"])


@router.post("/classify", response_model=ClassifyResponse)
def classify(body: ClassifyRequest, session: SessionDep, settings: SettingsDep,
             registry: Annotated[object, Depends(get_registry)]) -> ClassifyResponse:
    """Classify one or more dialogues (turns joined by [SEP]) with a fine-tuned model.

    ``mode="score"`` ranks the model's own labels, so every answer is a valid label;
    ``mode="generate"`` decodes free text as the upstream pipeline did and reports unparseable output.
    """
    started = time.perf_counter()
    texts = body.texts if body.texts is not None else [body.text]
    ref = resolve_model_ref(session, settings, body.model, labels=body.labels)
    predictions = registry.get(ref).classify(texts, mode=body.mode, top_k=body.top_k)
    return ClassifyResponse(
        model=body.model, mode=body.mode, latency_ms=round((time.perf_counter() - started) * 1000, 2),
        predictions=[
            PredictionOut(text=text, intent_id=p.intent_id, label=p.label, confidence=p.confidence,
                          top_k=[TopLabelOut(intent_id=t.intent_id, label=t.label, score=t.score) for t in p.top_k],
                          raw_output=p.raw_output, parsed=p.intent_id is not None, latency_ms=p.latency_ms)
            for text, p in zip(texts, predictions)
        ],
    )
