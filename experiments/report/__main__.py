"""`python -m experiments.report --workdir=...`: regenerates a reproduce run's reports."""

from absl import app, flags

from experiments.report import write_reports

# Defined only when run as a program: reproduce imports the package and has its own --workdir.
flags.DEFINE_string("workdir", "runs/reproduce", "the reproduce run's workdir")


def main(argv) -> None:
    del argv
    written = write_reports(flags.FLAGS.workdir)
    print("\n".join(str(p) for p in written))


app.run(main)
