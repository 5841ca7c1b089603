"""Presets of `experiments.reproduce`: flag defaults as data, one dict per preset; flags on the command line win.

`config.from_flags` reads them once (a flag's value is the command line's,
else the preset's, else the flag's own default). Nothing here imports JAX:
`python -m experiments.reproduce` reads `MIA_CPU_DEVICES` before it starts.

* ``tiny``: the tests' end-to-end run (seconds).
* ``quick``: the main job on CPU (README): ResNet-18 at initialisation, one
  bundled CIFAR-10 image, SGD and PowerSGD rank 4 under ``strongest``, in the
  ``table1`` setting, printed beside the committed ``results/table1`` cells.

``strongest`` units run every applicable attacker (the paper's ``observed``
one and the compression-aware objectives) as candidates and record each
candidate's SSIM, so one unit gives the observed, adaptive and strongest
columns of Table 1.
* ``table1``: the committed ``results/table1`` grid: ResNet-18 at
  initialisation, the paper's 11 configurations x 3 datasets, the same 4
  images per dataset (one unit each), eval mode, N = 4, local BatchNorm,
  ``strongest`` without the two candidates that never won a ResNet-18 cell
  (factors_residual, cosine_support), 1,000 iterations. Its other stages
  (train-mode controls, the trained victim, the budget, the seed spread)
  are flags on top (docs/experiments.md).
* ``paper``: the seed paper's scale (ResNet-18, 24,000 iterations, 16
  shadow models on 20,000-image pools), meant for a GPU.
"""

from __future__ import annotations

# Membership inference trains its models data-parallel over every device, so their numbers depend on the count:
# --cpu_devices' default when it runs, the count its committed results used (a unit at another count has its own key).
MIA_CPU_DEVICES = 8

# The seed paper's 11 configurations: SGD, PowerSGD ranks and Top-K at the matching levels (same wire size).
PAPER_COMPRESSORS = [
    "none",
    "powersgd:1",
    "powersgd:2",
    "powersgd:4",
    "powersgd:30",
    "powersgd:50",
    "topk_level:1",
    "topk_level:2",
    "topk_level:4",
    "topk_level:30",
    "topk_level:50",
]

# The study results/table1's round and attack (ResNet-18 at initialisation, eval mode, N = 4, B = 1, local BatchNorm,
# strongest without the two candidates that never won a ResNet-18 eval image, 1,000 iterations), shared by the
# table1 grid and the main job, so the main job's cells have the committed cells' setting.
TABLE1_SETTING: dict = dict(
    threat_models=["strongest"],
    strongest_exclude=["factors_residual", "cosine_support"],
    group=1,
    iterations=1000,
    restarts=1,
    model="resnet18",
    workers=4,
    bn_statistics=["eval"],
    mia=False,
)

PRESETS: dict[str, dict] = {
    "tiny": dict(
        datasets=["mnist"],
        compressors=["none", "powersgd:1"],
        threat_models=["observed"],
        images=1,
        group=1,
        iterations=20,
        restarts=1,
        model="convnet",
        workers=2,
        bn_statistics=["eval"],
        mia=True,
        mia_shadows=4,
        mia_steps=10,
        mia_pool=256,
        mia_population=64,
        mia_snapshots=[5],
        mia_budgets=[1, 2, 4],
    ),
    "table1": dict(
        TABLE1_SETTING,
        datasets=["cifar10", "mnist", "cifar100"],
        compressors=PAPER_COMPRESSORS,
        images=4,
    ),
    # The main job (README): the paper's model, one CIFAR-10 image of the table1 setting (same model, budget, N, B,
    # BatchNorm and attackers; the bundled sample's images), SGD against PowerSGD rank 4 under `strongest`, whose
    # candidates give the paper's observed attacker and the one that knows the compressor. Sized to finish in
    # 10 minutes on a 2-core CPU from a cold compilation cache. Membership inference: docs/membership.md.
    "quick": dict(TABLE1_SETTING, datasets=["cifar10"], compressors=["none", "powersgd:4"], images=1),
    "paper": dict(
        datasets=["cifar10", "cifar100", "mnist"],
        compressors=[
            "none",
            "powersgd:1",
            "topk_level:1",
            "powersgd:2",
            "topk_level:2",
            "powersgd:4",
            "topk_level:4",
            "powersgd:30",
            "topk_level:30",
            "powersgd:50",
            "topk_level:50",
        ],
        threat_models=["strongest"],
        images=10,
        group=10,
        iterations=24000,
        restarts=1,
        model="resnet18",
        workers=4,
        bn_statistics=["eval", "train"],
        mia=True,
        mia_shadows=16,
        mia_steps=3000,
        mia_pool=20000,
        mia_population=2000,
        mia_snapshots=[1000, 2000],
        mia_budgets=[1, 2, 4, 8, 16],
    ),
}
