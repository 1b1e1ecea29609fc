#!/usr/bin/env bash
# Install vLLM 0.33.0 for lorainv's vllm target into the active Python environment (any venv).
#
# vLLM's metadata pins torch 2.14 and CUDA packages that its v1 scheduler and KV cache manager
# do not need, so vLLM goes in with --no-deps and then only its pure-Python import
# dependencies; the CPU torch already in the venv (2.13) and numpy stay as they are.
# The wheel is about 336 MB (0.9 GB unpacked). Usage:
#   . .venv/bin/activate && ci/install-vllm.sh
#   python -m pytest -q tests/targets          # the vLLM tests run instead of skipping
set -euo pipefail

VLLM_VERSION="0.33.0"
PIP="${PIP:-python -m pip}"

python -c "import torch" 2>/dev/null || {
  echo "install-vllm: install torch first (lorainv's CI uses the CPU build of torch 2.13)" >&2
  exit 2
}

$PIP install -q --no-deps "vllm==${VLLM_VERSION}"
$PIP install -q \
  regex cachetools psutil tqdm blake3 py-cpuinfo "transformers<5.21" msgspec pyzmq cloudpickle \
  pydantic orjson pyyaml einops cbor2 pybase64 sentencepiece urllib3 aiohttp requests openai \
  openai-harmony pillow fastapi uvloop prometheus_client xgrammar partial-json-parser llguidance \
  hypothesis pytest safetensors

python - <<'PY'
import vllm
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: F401 - the import is the check

assert vllm.__version__.startswith("0.33.0"), vllm.__version__
print(f"install-vllm: vLLM {vllm.__version__} scheduler importable")
PY
