"""Slurm jobs: render the sbatch script (`render`), submit it (`submit`, the `megaent submit` verb),
and find the rollout servers of a job (`rollout_hosts`)."""
from megaent.slurm.render import JobSpec, SubmitError, job_spec, render_sbatch

__all__ = ["JobSpec", "SubmitError", "job_spec", "render_sbatch"]
