from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile, status

from app.api.deps import SessionDep, SettingsDep
from app.api.errors import error_responses
from app.schemas import DatasetOut
from app.services import datasets as service

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetOut,
             responses=error_responses(400, 413, 422))
def upload_dataset(session: SessionDep, settings: SettingsDep,
                   file: Annotated[UploadFile, File(description="CSV (CMCC-34 or text,label) or JSONL chat")],
                   name: Annotated[str | None, Form()] = None) -> DatasetOut:
    # A plain def: FastAPI runs it in a worker thread, so parsing and tokenizing a large upload does not
    # block other requests. At most one byte past the limit is read from the spooled upload into memory.
    raw = file.file.read(settings.max_upload_bytes + 1)
    return DatasetOut.model_validate(service.create_dataset(session, settings, raw, file.filename, name))


@router.get("", response_model=list[DatasetOut])
def list_datasets(session: SessionDep) -> list[DatasetOut]:
    return [DatasetOut.model_validate(d) for d in service.list_datasets(session)]


@router.get("/{dataset_id}", response_model=DatasetOut, responses=error_responses(404, 422))
def get_dataset(dataset_id: str, session: SessionDep) -> DatasetOut:
    return DatasetOut.model_validate(service.get_dataset(session, dataset_id))


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(404, 409, 422))
def delete_dataset(dataset_id: str, session: SessionDep, settings: SettingsDep) -> None:
    service.delete_dataset(session, settings, dataset_id)
