"""particleSeg's domain library: EMPIAR access, RELION, simulation, the corpus, the model and
cleaning, without Dagster (the assets in ``particleseg_assets`` call it)."""

import os as _os

# TensorFlow 2.21's oneDNN custom kernels corrupted the heap (glibc abort, segfault) while
# training the U-Net on these AVX-512 hosts, at random configurations; the Eigen kernels do
# not. Set before any TensorFlow import; an explicit TF_ENABLE_ONEDNN_OPTS=1 still wins.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
