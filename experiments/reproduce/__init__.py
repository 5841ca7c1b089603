r"""Reproduce and extend the study: Table 1, Figure 1 and Table 2 from one resumable run.

    python -m experiments.reproduce                       # --preset=quick: CPU, bundled data, minutes
    python -m experiments.reproduce --preset=paper        # ResNet-18, paper scale (GPU / several hosts)
    python -m experiments.reproduce --preset=table1 --dry_run   # the units and their expected duration only

Units of work, each appended to ``<workdir>/results.jsonl`` as one fsynced
line when it finishes. A unit is a pure function of its record: the record
names everything the unit reads (its images, the other workers' images, the
training batch of its victim, ...) and its key is a hash of the whole record,
so a rerun skips exactly the finished work:

* ``gradinv``: one setting (dataset, compressor, threat model, BatchNorm mode,
  observer, ...) and a group of victim batches. Each victim batch is worker
  0's batch in a real round of ``--workers`` workers (`attacks.victim`); its
  message is inverted and scored by SSIM / PSNR; reconstructions are saved
  under ``recon/``. A rerun with another ``--group`` or ``--images`` attacks
  only the victim batches no finished unit covers.
* ``mia``: dataset x compressor: target and shadow models trained with the
  compressor; threshold attacks and LiRA; the target's accuracy on held-out
  data and its wire bytes (the utility table).

A workdir holds one setting: a rerun whose flags change what a finished
result means (iterations, workers, the victims' training batch, ...) is
refused with the field named, since merging the two would count one cell
twice. Reports (`experiments.report`) are regenerated at the end of every run.

Modules, in the order a run uses them:

* `presets`: flag defaults as data (tiny, quick, table1, paper); no JAX.
* `config`: the flags, and `config.Config`, the one typed value the flags
  and the preset resolve into (once); its checks.
* `plan`: the units of a Config, their keys, the one-setting rule, each
  process's share, the results files and their shards.
* `units`: running a gradinv or MIA unit.
* `main`: the run (`main.run`) and absl's entry; ``__main__`` asks for the
  simulated CPU devices before JAX starts, then runs it.

This package's ``__init__`` imports nothing, so that ``python -m`` can set the
device count before any module here imports JAX.
"""
