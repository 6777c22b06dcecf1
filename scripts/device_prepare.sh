#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before the one device call of scripts/device_check.sh:
# puts what the GPU machine lacks into .device/ (git-ignored through .git/info/exclude):
#   .device/data/  the CIFAR-10 JPEG tar and the Fashion-MNIST IDX files (~51 MB)
#   .device/whl/   the serving stack + huggingface_hub 2.x as wheels for Python 3.12 (~6 MB)
# then prints the device call. Together with the tree it stays under the 64 MiB carry limit.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
mkdir -p .device/data/fashion-mnist .device/whl
cp -u ../shared/data/cifar10-jpeg.tar.gz .device/data/
cp -u /usr/share/datasets/fashion-mnist/*-ubyte.gz .device/data/fashion-mnist/
# Not in the GPU image (its package list: /work/.library/device/KINDS.md); versions = ours.
wheels=(litserve==0.2.19 pyzmq==27.3.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
  python-multipart==0.0.34 opentelemetry-api==1.45.2 huggingface_hub==2.4.0 httpx2==2.16.2
  httpcore2==2.16.2 truststore==0.10.5)
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d .device/whl "${wheels[@]}"
du -sh .device
echo "device call: run(command='bash scripts/device_check.sh', carry=['.device'], timeout_s=540)"
