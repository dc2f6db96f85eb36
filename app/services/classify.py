"""Classification requests: bounded before any model work, then run on a ready classifier."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.services.errors import NotFoundError, PayloadTooLargeError, ServiceUnavailableError, UnprocessableError
from app.services.models import resolve_model_ref


def check_request_size(settings: Settings, texts: list[str], *, single: bool) -> None:
    """413 for more dialogues, or a longer one, than one request may carry (settings ``classify_max_*``)."""
    if len(texts) > settings.classify_max_texts:
        raise PayloadTooLargeError(
            f"{len(texts)} texts in one request; at most {settings.classify_max_texts} (CLASSIFY_MAX_TEXTS): "
            "split the request", field="texts")
    limit = settings.classify_max_text_chars
    for index, text in enumerate(texts):
        if len(text) > limit:
            field = "text" if single else f"texts[{index}]"
            raise PayloadTooLargeError(
                f"{field} has {len(text)} characters; at most {limit} (CLASSIFY_MAX_TEXT_CHARS)", field=field)


def check_mode_supported(ref, mode: str, model: str) -> None:
    """A linear-head model has no answers to generate: refused before any model is loaded."""
    if mode == "generate" and ref.head != "lm":
        raise UnprocessableError(f"model '{model}' classifies with a linear head: it answers in score mode only",
                                 field="mode")


def classify_texts(session: Session, settings: Settings, backend, *, model: str, texts: list[str], single: bool,
                   labels: list[tuple[int, str]] | None, mode: str, top_k: int, strategy: str | None = None) -> list:
    """Predictions for ``texts`` (``app.ml.infer.base.Prediction``), in order, from the app's inference
    backend (``app.ml.infer.base.InferenceBackend``)."""
    from app.ml.infer.base import (
        AdapterUnavailableError,
        BackendUnavailableError,
        PromptTooLongError,
        UnsupportedRequestError,
    )

    check_request_size(settings, texts, single=single)
    ref = resolve_model_ref(session, settings, model, labels=labels)
    if labels and ref.adapter_dir is not None:
        raise UnprocessableError(f"labels are for zero-shot on a base model; '{model}' is a fine-tuned model and "
                                 "answers with the labels it was trained on", field="labels")
    check_mode_supported(ref, mode, model)
    # The ref is plain data: give the connection back before waiting for the model, or concurrent requests
    # queueing for inference would exhaust the connection pool (and wait on it instead of the batcher).
    session.close()
    try:
        return backend.classify(ref, texts, mode=mode, top_k=top_k, strategy=strategy or settings.classify_strategy)
    except PromptTooLongError as exc:
        raise UnprocessableError(f"{exc}: use fewer or shorter labels, or raise CLASSIFY_MAX_INPUT_LENGTH",
                                 field="labels" if labels else "model") from None
    except BackendUnavailableError as exc:
        raise ServiceUnavailableError(str(exc), retry_after=exc.retry_after) from None
    except AdapterUnavailableError as exc:
        raise NotFoundError(f"model '{model}': {exc}", field="model") from None
    except UnsupportedRequestError as exc:
        raise UnprocessableError(str(exc), field="labels" if labels else "mode") from None
